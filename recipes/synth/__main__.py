"""``python -m recipes.synth run|data``, from the repository root: the three-stage run, or its data alone."""

from __future__ import annotations

import argparse
import sys

from .curriculum import Curriculum

PROG = "python -m recipes.synth"


def _mix(text: str | None, flag: str = "--mix") -> dict[str, float] | None:
    """``--mix colour=1,ocr=2`` -> {"colour": 1.0, "ocr": 2.0}; synthesize checks the task names and weights."""
    if text is None:
        return None
    mix = {}
    for item in text.split(","):
        task, _, weight = item.partition("=")
        try:
            mix[task.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"{flag} wants TASK=WEIGHT pairs separated by commas, got {item!r}") from None
    return mix


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="the synthetic curriculum of models/qwen2vl-synth")
    verbs = p.add_subparsers(dest="verb", required=True)
    default = Curriculum(out="")

    run = verbs.add_parser("run", help="from scratch through the three stages on synthetic data, then eval")
    run.add_argument("--out", required=True, help="run directory (a stopped run picks up where it stopped)")
    run.add_argument("--seed", type=int, default=default.seed)
    run.add_argument("--train-examples", type=int, default=default.train_examples)
    run.add_argument("--test-examples", type=int, default=default.test_examples)
    run.add_argument("--mix", metavar="TASK=W,...", help="weigh the train split's tasks (default: data.TRAIN_MIX)")
    run.add_argument("--steps", type=int, nargs=3, default=list(default.steps), metavar=("S1", "S2", "S3"))
    run.add_argument(
        "--lr", type=float, nargs=3, default=list(default.lr), metavar=("LR1", "LR2", "LR3"), help="peak lr per stage"
    )
    run.add_argument(
        "--focus-steps",
        type=int,
        default=default.focus_steps,
        help="stage 2 opens with this many steps on the OCR conversations alone (0: none)",
    )
    run.add_argument("--focus-lr", type=float, default=default.focus_lr, help="peak learning rate of the focus")
    run.add_argument(
        "--warmup-steps", type=int, default=default.warmup_steps, help="each stage's warmup (below its steps)"
    )
    run.add_argument("--batch-tokens", type=int, default=default.batch_tokens)
    run.add_argument("--agent-steps", type=int, default=default.agent_steps,
                     help="steps of the agent stage on GUI episodes after stage 3 (0: none)")
    run.add_argument("--agent-episodes", type=int, default=default.agent_episodes)
    run.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=default.dtype,
        help="bfloat16: every stage under bf16 autocast (weights and optimizer stay fp32); float32 on a CPU "
        "without bf16 instructions",
    )
    run.add_argument(
        "--rope-theta", type=float, default=default.model["rope_theta"], help="the LLM's rotary base (%(default)g)"
    )
    run.add_argument(
        "--mrope-section",
        type=int,
        nargs=3,
        metavar=("T", "H", "W"),
        default=default.model["mrope_section"],
        help="how many of the LLM's head_dim/2 rotary frequencies, fastest first, turn with the temporal, height "
        "and width positions (default: %(default)s)",
    )
    run.add_argument(
        "--kv-heads",
        type=int,
        choices=[1, 2, 4],
        default=default.model["kv_heads"],
        help="the LLM's key/value heads, shared by its 4 query heads (default %(default)s: one each)",
    )

    data = verbs.add_parser("data", help="write the synthetic data (train and held-out splits)")
    data.add_argument("--out", required=True)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--train", type=int, default=4000)
    data.add_argument("--test", type=int, default=default.test_examples)
    data.add_argument(
        "--mix",
        metavar="TASK=W,...",
        help="weigh the train split's tasks, e.g. ocr=1 or colour=1,grounding=2 (tasks left out get none; "
        "default: the curriculum's mix)",
    )
    data.add_argument(
        "--test-mix",
        metavar="TASK=W,...",
        help="weigh the held-out split's tasks the same way (default: all six equally); e.g. --seed 1000 "
        "--train 0 --test 600 --test-mix grounding=1 for 600 fresh grounding pictures",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.verb == "run":
            from .curriculum import run

            sections = tuple(args.mrope_section)
            model = {"rope_theta": args.rope_theta, "mrope_section": sections, "kv_heads": args.kv_heads}
            c = Curriculum(
                out=args.out,
                seed=args.seed,
                train_examples=args.train_examples,
                test_examples=args.test_examples,
                mix=_mix(args.mix),
                model=model,
                batch_tokens=args.batch_tokens,
                steps=tuple(args.steps),
                lr=tuple(args.lr),
                focus_steps=args.focus_steps,
                focus_lr=args.focus_lr,
                warmup_steps=args.warmup_steps,
                dtype=args.dtype,
                agent_steps=args.agent_steps,
                agent_episodes=args.agent_episodes,
            )
            run(c)
        else:
            from .data import synthesize

            mixes = dict(mix=_mix(args.mix), test_mix=_mix(args.test_mix, "--test-mix"))
            counts = synthesize(args.out, args.seed, args.train, args.test, **mixes)
            for split, tasks in counts.items():
                print(f"{split}: " + ", ".join(f"{k} {v}" for k, v in tasks.items()))
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:  # one line naming the problem
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
