"""Fine-tuning: the pretraining loop (launcher.training.trainer.Trainer) on prompt/target examples.

What changes from pretraining:
  - the weights come from the pretrained checkpoint (any expert-parallel size; weights only: the optimizer and
    the schedule start afresh); a resumed run takes its own checkpoint's instead;
  - the data source is launcher.training.sft_data.FinetuneData (loss on target tokens only);
  - before the first step, the pretrained model is validated (iteration 0: what fine-tuning improves on);
  - after each epoch's validation the checkpoint records its validation loss, `checkpoints/best` names the
    lowest, every checkpoint but the latest and the best is deleted, and a few VALID prompts are generated for
    into `samples/epoch_NNN.jsonl`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from launcher.files import write_text_atomic
from launcher.training.checkpoint import _agree, find_checkpoint, load_model_weights
from launcher.training.distributed import barrier, broadcast_from_main
from launcher.training.sft_data import FinetuneData, data_digest
from launcher.training.trainer import Trainer
from launcher.errors import UsageError


class FinetuneTrainer(Trainer):
    last_eval: tuple[int, dict] | None = None
    best: tuple[Path, float] | None = None

    def initial_weights(self, model) -> None:
        cfg = self.cfg
        resumes = broadcast_from_main(find_checkpoint(cfg.load or cfg.run_dir / "checkpoints") is not None
                                      if self.placement.is_main else None)
        if resumes:
            return  # the run's own checkpoint holds the fine-tuned weights, loaded by the Checkpointer
        pretrained = Path(cfg.finetune.pretrained)
        try:
            load_model_weights(model, pretrained)
            error = None
        except UsageError as exc:
            error = str(exc)
        _agree(error)  # a rank that could not load must not leave the others waiting in the engine's set-up
        if self.placement.is_main:
            print(f"weights: {pretrained} (EP {self.mcfg.ep_size} here; optimizer and schedule start afresh)",
                  flush=True)

    def build_data(self) -> FinetuneData:
        return FinetuneData(self.cfg, self.placement, self.tokenizer)

    def before_training(self, writer) -> None:
        self._eval(writer, 0)

    def epoch(self, iteration: int) -> float:
        return iteration / self.data.iters_per_epoch

    def _eval(self, writer, iteration) -> dict:
        result = self.evaluate()
        if result:
            result["epoch"] = round(self.epoch(iteration), 4)
            what = "pretrained model" if iteration == 0 else f"epoch {result['epoch']:g}/{self.cfg.finetune.epochs}"
            writer.message(f"validation ({what}, iteration {iteration}): loss {result['loss']:.4f}, "
                           f"perplexity {result['ppl']:.2f} on {self.cfg.finetune.valid_path}")
            writer.record("valid", iteration, result)
            writer.flush()
        self.last_eval = (iteration, result)
        return result

    def _save(self, writer, iteration, state: dict | None = None) -> Path | None:
        valid = self.last_eval[1] if self.last_eval and self.last_eval[0] == iteration else {}
        state = {"epoch": self.epoch(iteration), "valid_loss": valid.get("loss"),
                 "data_digest": self.cfg.finetune.data_digest or data_digest(self.cfg)}
        tag_dir = super()._save(writer, iteration, state)
        if tag_dir is None:
            return None
        if self.placement.is_main:
            best = self.checkpointer.keep_last_and_best(tag_dir, valid.get("loss"))
            if best is not None:
                self.best = (best, json.loads((best / "trainer_state.json").read_text())["valid_loss"])
        if valid and self.cfg.finetune.samples:
            self._write_samples(writer, tag_dir, iteration)
        return tag_dir

    def _write_samples(self, writer, tag_dir: Path, iteration: int) -> None:
        """Rank 0 generates from the checkpoint just saved (every expert in one process, whatever the EP
        size); the others wait."""
        if self.placement.is_main:
            t0 = time.perf_counter()
            pairs = self.data.sample_pairs(self.cfg.finetune.samples)
            generations = generate_samples(tag_dir, [p for p, _ in pairs], self.cfg.finetune.sample_tokens,
                                           self.placement.device)
            epoch = round(self.epoch(iteration))
            records = [{"epoch": self.epoch(iteration), "iteration": iteration, "prompt": prompt, "target": target,
                        "generation": text} for (prompt, target), text in zip(pairs, generations)]
            path = self.cfg.run_dir / "samples" / f"epoch_{epoch:03d}.jsonl"
            write_text_atomic("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), path)
            first = records[0]
            writer.message(f"samples: {path} ({time.perf_counter() - t0:.1f} s); {first['prompt']!r} -> "
                           f"{first['generation'][:120]!r}")
        barrier()

    def run(self, stop) -> int:
        code = super().run(stop)
        if self.best is not None and self.placement.is_main:
            print(f"best: {self.best[0]} (validation loss {self.best[1]:.4f})", flush=True)
        return code


def generate_samples(tag_dir: Path, prompts: list[str], max_new_tokens: int, device) -> list[str]:
    """Greedy continuations of `prompts` by checkpoint tag_dir, decoded as one batch, each stopping at the
    end-of-document token or where the model's positions run out."""
    from launcher.generate import fit_prompts
    from launcher.inference import load_checkpoint
    from model.generation import Decoder, Request, SamplingParams

    model, tokenizer, _ = load_checkpoint(tag_dir, device)
    ids = [tokenizer.encode(p) if p else [tokenizer.eod_id] for p in prompts]  # "": a new document
    fitted, _ = fit_prompts(ids, None, max_new_tokens, model.config.seq_len)
    stop = (tokenizer.eod_id,)
    done = Decoder(model, decode=tokenizer.decode, pad_id=tokenizer.pad_id).run(
        [Request(p, SamplingParams(max_new_tokens=budget, temperature=0.0, stop_token_ids=stop))
         for p, budget in fitted])
    return [c.text(tokenizer.decode) for c in done]
