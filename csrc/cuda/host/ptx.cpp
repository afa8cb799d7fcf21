// The PTX instructions of mma.cuh, executed lane by lane with the ISA's semantics (PTX ISA 8.x,
// "Warp-level matrix instructions": the mma fragment figures for m16n8k8 .tf32 and m16n8k16
// .f16/.bf16, ldmatrix, cp.async), and the conversions the device code uses.
//
// The fragment layouts below are written from the ISA's tables (groupID = lane >> 2,
// threadID_in_group = lane % 4), not from the kernels; tests/test_cuda_host.py checks them against
// the ISA's figures. Every mma gathers the warp's fragments into whole matrices through them,
// multiplies, and hands each lane back exactly the accumulators the table gives it.
//
// Arithmetic model: products of tf32 / f16 / bf16 values are exact in double, and D = C + sum A B
// is summed in double and rounded once to float. Tensor cores sum in a wider-than-fp32 but
// unspecified way (often truncating): results here are at least as accurate as the hardware's, so
// the host execution checks the kernels' logic and data flow, not the last bit of a product.
#include <cmath>
#include <cstring>
#include <string>

#include <cuda_runtime.h>

#include "sim_state.h"

namespace fastcl::host {

// ---- conversions ----------------------------------------------------------------------------------

uint16_t float_to_half_bits(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // IEEE binary16, round to nearest even (cvt.rn.f16.f32)
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return std::isnan(f) ? uint16_t{0x7fff} : bits;  // the device's canonical NaN
}

float half_bits_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

uint16_t float_to_bfloat16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fff;
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even; overflows to inf as it should
  return static_cast<uint16_t>(u >> 16);
}

float bfloat16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

namespace ptx {

namespace {

struct Coord {
  int row, col;
};

// ---- fragment layouts, from the PTX ISA -----------------------------------------------------------
// m16n8k8 with .tf32 A (16 x 8, row-major), one element per register a0..a3:
//   row = groupID for a0, a2; groupID + 8 for a1, a3.  col = threadID_in_group for a0, a1; + 4 for a2, a3.
Coord a_tf32(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return {g + 8 * (i % 2), t + 4 * (i / 2)};
}
// m16n8k8 .tf32 B (8 x 8, "col"): b0, b1: row (k) = threadID_in_group, + 4 for b1; col (n) = groupID.
Coord b_tf32(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return {t + 4 * i, g};
}
// m16n8k16 .f16/.bf16 A (16 x 16): registers a0..a3 hold two elements each, elements a0..a7
// (the lower-numbered element in the register's lower half):
//   row = groupID for a0, a1, a4, a5; groupID + 8 for a2, a3, a6, a7.
//   col = threadID_in_group * 2 + (i & 1) for a0..a3; the same + 8 for a4..a7.
Coord a_16bit(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return {g + 8 * ((i >> 1) & 1), t * 2 + (i & 1) + 8 * (i >> 2)};
}
// m16n8k16 B (16 x 8): b0..b3 in two registers: row (k) = threadID_in_group * 2 + (i & 1), + 8 for
// b2, b3; col (n) = groupID.
Coord b_16bit(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return {t * 2 + (i & 1) + 8 * (i >> 1), g};
}
// C / D of m16n8 with .f32 accumulators, c0..c3: row = groupID for c0, c1; + 8 for c2, c3;
// col = threadID_in_group * 2 + (i & 1).
Coord cd_f32(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return {g + 8 * (i >> 1), t * 2 + (i & 1)};
}
// ldmatrix .m8n8 .b16 (no .trans): each lane receives, of every matrix, the two elements of row
// lane / 4 at columns 2 (lane % 4) and + 1.
Coord ldmatrix_b16(int lane, int i) { return {lane / 4, 2 * (lane % 4) + i}; }

uint16_t half_of(uint32_t reg, int i) { return static_cast<uint16_t>(i == 0 ? reg & 0xffffu : reg >> 16); }

float tf32_value(uint32_t reg) {  // a .tf32 operand: the register's upper 19 bits
  const uint32_t u = reg & 0xffffe000u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct MmaOperands {
  const uint32_t* a;
  const uint32_t* b;
  float* cd;
};

// D = A B + C for the warp: gather through the layouts, multiply in double, scatter back.
template <int K, typename AValue, typename ALayout, typename BLayout>
void warp_mma(Meeting& m, int a_elems, int b_elems, ALayout a_at, BLayout b_at, AValue value) {
  double A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
  for (int l = 0; l < 32; ++l) {
    const auto* op = static_cast<const MmaOperands*>(m.in[l]);
    for (int i = 0; i < a_elems; ++i) {
      const Coord c = a_at(l, i);
      A[c.row][c.col] = value(op->a, i, a_elems);
    }
    for (int i = 0; i < b_elems; ++i) {
      const Coord c = b_at(l, i);
      B[c.row][c.col] = value(op->b, i, b_elems);
    }
    for (int i = 0; i < 4; ++i) {
      const Coord c = cd_f32(l, i);
      C[c.row][c.col] = op->cd[i];
    }
  }
  float D[16][8];
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 8; ++n) {
      double acc = C[r][n];
      for (int k = 0; k < K; ++k) acc += A[r][k] * B[k][n];
      D[r][n] = static_cast<float>(acc);
    }
  }
  for (int l = 0; l < 32; ++l) {
    float* cd = static_cast<const MmaOperands*>(m.in[l])->cd;
    for (int i = 0; i < 4; ++i) {
      const Coord c = cd_f32(l, i);
      cd[i] = D[c.row][c.col];
    }
  }
}

}  // namespace

bool fragment(const char* shape, const char* operand, int lane, int element, int& row, int& col) {
  if (lane < 0 || lane > 31 || element < 0) return false;
  const std::string s = shape, o = operand;
  Coord c{};
  if (s == "m16n8k8.tf32" && o == "a" && element < 4) c = a_tf32(lane, element);
  else if (s == "m16n8k8.tf32" && o == "b" && element < 2) c = b_tf32(lane, element);
  else if (s == "m16n8k16.16bit" && o == "a" && element < 8) c = a_16bit(lane, element);
  else if (s == "m16n8k16.16bit" && o == "b" && element < 4) c = b_16bit(lane, element);
  else if ((s == "m16n8k8.tf32" || s == "m16n8k16.16bit") && o == "c" && element < 4) c = cd_f32(lane, element);
  else if (s == "m8n8.b16" && o == "a" && element < 2) c = ldmatrix_b16(lane, element);
  else return false;
  row = c.row;
  col = c.col;
  return true;
}

uint32_t cvt_rna_tf32_f32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x007fffffu) != 0 ? 0x7fffffffu : u;  // NaN, +-inf
  // Half of the dropped 13 bits' unit added to the magnitude, then truncated: nearest, ties away from
  // zero; a carry into the exponent is the correct rounding up (to inf past the largest tf32).
  return (u + 0x1000u) & 0xffffe000u;
}

void mma_m16n8k8_tf32(float cd[4], const uint32_t a[4], const uint32_t b[2]) {
  MmaOperands op{a, b, cd};
  sim().meet("mma.sync.m16n8k8.tf32", std::source_location::current(), 0xffffffffu, &op, nullptr, 0,
             [](Meeting& m, int) {
               warp_mma<8>(m, 4, 2, a_tf32, b_tf32,
                           [](const uint32_t* regs, int i, int) { return static_cast<double>(tf32_value(regs[i])); });
             });
}

void mma_m16n8k16(Half type, float cd[4], const uint32_t a[4], const uint32_t b[2]) {
  MmaOperands op{a, b, cd};
  if (type == Half::kF16) {
    sim().meet("mma.sync.m16n8k16.f16", std::source_location::current(), 0xffffffffu, &op, nullptr, 0,
               [](Meeting& m, int) {
                 warp_mma<16>(m, 8, 4, a_16bit, b_16bit, [](const uint32_t* regs, int i, int) {
                   return static_cast<double>(half_bits_to_float(half_of(regs[i / 2], i % 2)));
                 });
               });
  } else {
    sim().meet("mma.sync.m16n8k16.bf16", std::source_location::current(), 0xffffffffu, &op, nullptr, 0,
               [](Meeting& m, int) {
                 warp_mma<16>(m, 8, 4, a_16bit, b_16bit, [](const uint32_t* regs, int i, int) {
                   return static_cast<double>(bfloat16_bits_to_float(half_of(regs[i / 2], i % 2)));
                 });
               });
  }
}

// ldmatrix .x4: lanes 8 i .. 8 i + 7 give the row addresses of matrix i (16 bytes each, 16-byte
// aligned, in shared memory); every lane receives its pair of each matrix (ldmatrix_b16).
void ldmatrix_m8n8_x4_b16(uint32_t r[4], const void* row) {
  sim().meet("ldmatrix.sync.m8n8.x4.b16", std::source_location::current(), 0xffffffffu, row, r, 0,
             [](Meeting& m, int warp) {
               Sim& s = sim();
               uint16_t mat[4][8][8];
               for (int l = 0; l < 32; ++l) {
                 const auto a = reinterpret_cast<uintptr_t>(m.in[l]);
                 if (a % 16 != 0 || !s.is_shared(a)) {
                   s.report(a % 16 != 0 ? "alignment" : "shared bounds",
                            "ldmatrix row address of lane " + std::to_string(l) +
                                (a % 16 != 0 ? " is not 16-byte aligned" : " is not shared memory"));
                   std::memset(mat[l / 8][l % 8], 0, 16);
                   continue;
                 }
                 s.shared_access(a, 16, false, warp * 32 + l, __builtin_return_address(0));
                 std::memcpy(mat[l / 8][l % 8], m.in[l], 16);
               }
               for (int l = 0; l < 32; ++l) {
                 auto* out = static_cast<uint32_t*>(m.out[l]);
                 for (int i = 0; i < 4; ++i) {
                   const Coord lo = ldmatrix_b16(l, 0), hi = ldmatrix_b16(l, 1);
                   out[i] = static_cast<uint32_t>(mat[i][lo.row][lo.col]) |
                            static_cast<uint32_t>(mat[i][hi.row][hi.col]) << 16;
                 }
               }
             });
}

// ---- cp.async ---------------------------------------------------------------------------------------

void cp_async_cg_16(void* dst, const void* src, int src_bytes) {
  Sim& s = sim();
  Fiber* f = s.current;
  const auto d = reinterpret_cast<uintptr_t>(dst);
  const void* pc = __builtin_return_address(0);
  if (d % 16 != 0) {
    s.report("alignment", "cp.async destination not 16-byte aligned");
    return;
  }
  if (!s.is_shared(d)) {
    s.report("shared bounds", "cp.async destination is not shared memory");
    return;
  }
  if (src_bytes > 0) {
    std::string why;
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) {
      s.report("alignment", "cp.async source not 16-byte aligned");
    } else if (!s.in_allocation(reinterpret_cast<uintptr_t>(src), static_cast<size_t>(src_bytes), &why)) {
      s.report("global bounds", "cp.async read of " + why);
      src_bytes = 0;  // nothing to read: the copy zero-fills
    }
    ++s.counters.global_accesses;
  }
  // The copy may land at any moment until its wait_group: it writes now, as far as others can tell.
  Shadow* sh = s.shared_shadow(d, 16, nullptr);
  if (sh == nullptr) return;
  s.shared_access(d, 16, true, f->tid, pc);
  for (int i = 0; i < 16; ++i) sh[i].state = Shadow::kPending;
  s.block->thread_state[f->tid].uncommitted.push_back({reinterpret_cast<uint8_t*>(dst),
                                                      static_cast<const uint8_t*>(src), src_bytes});
}

void cp_async_commit_group() {
  Sim& s = sim();
  ThreadState& t = s.block->thread_state[s.current->tid];
  t.groups.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}

// cp.async.wait_group N: every committed group but the newest N has landed, and only those.
void cp_async_wait_group(int pending) {
  Sim& s = sim();
  const int tid = s.current->tid;
  ThreadState& t = s.block->thread_state[tid];
  while (static_cast<int>(t.groups.size()) > pending) {
    for (const Copy& c : t.groups.front()) {
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
      std::memset(c.dst + c.src_bytes, 0, static_cast<size_t>(16 - c.src_bytes));
      Shadow* sh = s.shared_shadow(reinterpret_cast<uintptr_t>(c.dst), 16, nullptr);
      for (int i = 0; i < 16; ++i) {
        sh[i].state = Shadow::kWritten;
        sh[i].writer = static_cast<int16_t>(tid);
        sh[i].write_epoch = s.block->epoch;
      }
    }
    t.groups.erase(t.groups.begin());
  }
}

}  // namespace ptx
}  // namespace fastcl::host
