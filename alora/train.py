"""Placeholder: `alora train` is being written (issue "Demo intrinsics")."""


def add_parser(subparsers) -> None:
    subparsers.add_parser("train", help="train an aLoRA or LoRA adapter (not yet available)")
