"""Fine-tune a pretrained GPT-MoE on prompt/target pairs:

    python -m launcher.finetune [MODE] TASK_NAME TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH
        MODEL_SIZE MOE RT BATCH_SIZE EPOCH SP AC ZERO SEQ_LEN [--flag value ...]

(examples/megatron/run_finetune_text_generation_gpt.sh hands its arguments here.) The line is resolved by
launcher.finetune_cli and launched as pretraining is (launcher.__main__); every process then runs
`python -m launcher.finetune --run-config RUN_DIR/run_config.json`, the per-process training entry point
(launcher.pretrain), which trains what the run config describes.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--run-config"]:
        from launcher.pretrain import main as run_worker

        return run_worker(argv)
    from launcher.__main__ import main as launch
    from launcher.finetune_cli import USAGE, build_finetune_config

    return launch(argv, build=build_finetune_config, usage=USAGE, module="launcher.finetune")


if __name__ == "__main__":
    sys.exit(main())
