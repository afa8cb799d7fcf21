"""``fastcl.cached_loss`` inside the real trainers that call ``loss.backward()`` themselves: the HF
``transformers.Trainer`` (its sampler, gradient accumulation, optimiser and scheduler) and Lightning's
automatic optimisation. Each trains a few steps with the cached loss and again with the plain loss
(the same towers, data order and seeds); the logged losses and the parameters after the last step
must be equal (float64), dropout off (the issue's acceptance) and on (the cached step replays the
RNG, so the draws are the plain step's too). sentence-transformers' trainer: in
tests/test_integrations_sentence_transformers.py; the loop these trainers share, cut to its bones,
in tests/test_cached_loss.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastcl
from cached_cases import D_IN, Tower
from tolerances import assert_close, tol

ROWS, CHUNK, STEPS = 24, 5, 3  # five chunks of each batch, the last one ragged
BATCHES = 8


class TwoTowers(nn.Module):
    """Image and text towers with CLIP's learnable log scale: what a trainer's model holds."""

    def __init__(self, dropout: float):
        super().__init__()
        self.img, self.txt = Tower(0, dropout), Tower(1, dropout, scale=True)

    def loss(self, a, b, cached: bool) -> torch.Tensor:
        def loss_fn(u, v):
            return fastcl.clip_loss(u, v, self.txt.log_scale.exp())
        if cached:
            return fastcl.cached_loss(loss_fn, [self.img, self.txt], [a, b], chunk_size=CHUNK)
        return loss_fn(self.img(a), self.txt(b))


def _data():
    gen = torch.Generator().manual_seed(11)
    return [{"a": torch.randn(D_IN, generator=gen, dtype=torch.float64),
             "b": torch.randn(D_IN, generator=gen, dtype=torch.float64)} for _ in range(ROWS * BATCHES)]


def _compare(runs):
    (got_losses, got), (want_losses, want) = runs
    assert len(got_losses) == len(want_losses) >= STEPS
    assert_close(torch.tensor(got_losses), torch.tensor(want_losses), tol("cached gradients"), "logged losses")
    assert_close(got, want, tol("cached gradients"), "parameters after the steps")
    start = {n: p.detach() for n, p in TwoTowers(0.0).named_parameters()}
    assert max((got[n] - start[n]).abs().max().item() for n in got) > 1e-3, "the steps changed nothing"


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_hf_trainer(tmp_path, dropout, accumulation):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class ContrastiveTrainer(transformers.Trainer):
        cached = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model.loss(inputs["a"], inputs["b"], self.cached)

    runs = []
    for cached in (True, False):
        model = TwoTowers(dropout)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(cached)), per_device_train_batch_size=ROWS // accumulation,
            gradient_accumulation_steps=accumulation, max_steps=STEPS, learning_rate=0.5, max_grad_norm=0.0,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=3,
            remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)
        trainer = ContrastiveTrainer(model=model, args=args, train_dataset=_data(),
                                     data_collator=transformers.default_data_collator)
        trainer.cached = cached
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    _compare(runs)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_lightning(tmp_path, dropout, accumulation):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self, cached: bool):
            super().__init__()
            self.towers, self.cached, self.losses = TwoTowers(dropout), cached, []

        def training_step(self, batch, index):
            loss = self.towers.loss(batch["a"], batch["b"], self.cached)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    runs = []
    for cached in (True, False):
        pl.seed_everything(3, verbose=False)
        module = Module(cached)
        loader = torch.utils.data.DataLoader(_data(), batch_size=ROWS // accumulation, shuffle=True)
        trainer = pl.Trainer(max_steps=STEPS, accumulate_grad_batches=accumulation, accelerator="cpu",
                             devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(tmp_path / str(cached)))
        trainer.fit(module, loader)
        runs.append((module.losses, {n.removeprefix("towers."): p.detach().clone()
                                     for n, p in module.named_parameters()}))
    _compare(runs)
