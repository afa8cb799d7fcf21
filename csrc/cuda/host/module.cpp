// The host execution as a torch library, torch.ops.fastcl_cuda_host_<hash> (host/name.cpp): the CUDA backend's own glue
// (../ops_cuda.cpp, included with FASTCL_HOST_EXEC: the same blocks, G scale, GEMMs and partial sums)
// on CPU tensors, its kernels run lane by lane (sim.cpp, block.cpp, ptx.cpp), plus what the tests ask
// the checkers. Built by tests/cuda_host.py from the source tree, never shipped.
#include "../ops_cuda.cpp"

#include <c10/core/CPUAllocator.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>

#include "sim.h"

namespace fastcl::host {
namespace {

// CPU memory with its exact size known to the checkers and 64 bytes of red zone on each side, so a
// kernel's read or write past a buffer's end never lands in another buffer. The context is the data
// pointer itself (the deleter finds the red zone before it): ATen's raw_allocate, which some CPU
// kernels use for scratch (bfloat16 matmuls), asserts the two are equal.
class TrackingAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kRedZone = 64;

  c10::DataPtr allocate(size_t bytes) override {
    const size_t total = (bytes + 2 * kRedZone + kRedZone - 1) / kRedZone * kRedZone;
    auto* raw = static_cast<char*>(std::aligned_alloc(kRedZone, total));
    TORCH_CHECK(raw != nullptr, "fastcl host execution: out of memory allocating ", bytes, " bytes");
    char* data = raw + kRedZone;
    note_allocation(data, bytes);
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  static void release(void* data) {
    forget_allocation(data);
    std::free(static_cast<char*>(data) - kRedZone);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const { std::memcpy(dest, src, count); }
};

TrackingAllocator g_tracking;
c10::Allocator* g_previous = nullptr;
constexpr uint8_t kPriority = 100;  // above the default CPU allocator's

// While on, every CPU tensor is allocated by g_tracking (c10::SetCPUAllocator); the kernels may touch
// global memory only inside those allocations.
void track_allocations(bool on) {
  if (on && g_previous == nullptr) {
    g_previous = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&g_tracking, kPriority);
  } else if (!on && g_previous != nullptr) {
    c10::SetCPUAllocator(g_previous, kPriority);
    g_previous = nullptr;
  }
}

std::vector<int64_t> fragment_at(const std::string& shape, const std::string& operand, int64_t lane,
                                 int64_t element) {
  int row = 0, col = 0;
  if (!ptx::fragment(shape.c_str(), operand.c_str(), static_cast<int>(lane), static_cast<int>(element), row, col))
    return {};
  return {row, col};
}

std::string reports() { return reports_text(); }
int64_t count_of(const std::string& kind) { return report_count(kind.c_str()); }
std::string variants() { return variants_text(); }
int64_t tf32_bits(double x) { return ptx::cvt_rna_tf32_f32(static_cast<float>(x)); }
int64_t half_bits(double x) { return float_to_half_bits(static_cast<float>(x)); }
int64_t bfloat16_bits(double x) { return float_to_bfloat16_bits(static_cast<float>(x)); }

std::vector<int64_t> counter_values() {
  const Counters c = counters();
  return {c.launches, c.blocks, c.threads, c.meetings, c.shared_accesses, c.global_accesses};
}

}  // namespace
}  // namespace fastcl::host

// The library's name differs per build (host/name.cpp), so that a test process can load the tree's
// build and the planted-bug builds side by side; this object is shared by all of them.
const char* fastcl_host_library_name();

namespace fastcl::host {
namespace {

void define(torch::Library& m) {
  // the CUDA backend's operators (csrc/ops.cpp's schemas), on CPU tensors
  m.def("lse_forward", &fastcl::lse_forward_cuda);
  m.def("lse_backward", &fastcl::lse_backward_cuda);
  m.def("lse_forward_excluding", &fastcl::lse_forward_excluding_cuda);
  m.def("lse_backward_excluding", &fastcl::lse_backward_excluding_cuda);
  m.def("pointwise", &fastcl::pointwise_cuda);
  m.def("lse_forward_prefixes", &fastcl::lse_forward_prefixes_cuda);
  m.def("lse_backward_prefixes", &fastcl::lse_backward_prefixes_cuda);
  m.def("pointwise_prefixes", &fastcl::pointwise_prefixes_cuda);
  // the checkers
  m.def("track_allocations(bool on) -> ()", &fastcl::host::track_allocations);
  m.def("reset_reports() -> ()", &fastcl::host::reset_reports);
  m.def("reports() -> str", &fastcl::host::reports);
  m.def("report_count(str kind) -> int", &fastcl::host::count_of);
  m.def("counters() -> int[]", &fastcl::host::counter_values);
  m.def("variants() -> str", &fastcl::host::variants);
  // the PTX model and the conversions, for their own tests
  m.def("fragment(str shape, str operand, int lane, int element) -> int[]", &fastcl::host::fragment_at);
  m.def("cvt_rna_tf32(float x) -> int", &fastcl::host::tf32_bits);
  m.def("float_to_half_bits(float x) -> int", &fastcl::host::half_bits);
  m.def("float_to_bfloat16_bits(float x) -> int", &fastcl::host::bfloat16_bits);
}

const auto g_library = [] {
  auto library = std::make_unique<torch::Library>(torch::Library::DEF, fastcl_host_library_name(), std::nullopt,
                                                  __FILE__, static_cast<uint32_t>(__LINE__));
  define(*library);
  return library;
}();

}  // namespace
}  // namespace fastcl::host
