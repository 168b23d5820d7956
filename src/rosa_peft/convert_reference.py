"""`rosa convert-reference`: convert a peft-rosa (reference) adapter directory to ours, or ours back to it.

The formats and the conversion live in :mod:`rosa_peft.reference_format`; this module only parses flags.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="the adapter directory to read")
    p.add_argument("out", metavar="OUT", help="the adapter directory to write (appears whole or not at all)")
    p.add_argument("--to", choices=("rosa", "reference"), default="rosa",
                   help="'rosa': SRC is a peft-rosa adapter, OUT ours; 'reference': the reverse")
    p.add_argument("--masks", metavar="PATH", default=None,
                   help="(--to rosa) the reference's mask file (torch.save dict) or directory of *.mask files; "
                        "checked against the adapter, and needed where the adapter lacks the sparse structure")
    p.add_argument("--base", metavar="MODEL", default=None,
                   help="base model (HF id or local path) giving the column count of rank-0 layers")
    p.add_argument("--rosa-dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="(--to reference) dtype of the written tensors (default: the adapter's own)")
    p.add_argument("--write-masks", action="store_true",
                   help="(--to reference) also write the reference's mask file OUT/masks.pt")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from . import reference_format as rf
    from .utils.checks import UserError

    if args.to == "rosa" and (args.rosa_dtype or args.write_masks):
        raise UserError("--rosa-dtype and --write-masks apply to --to reference only")
    if args.to == "reference" and args.masks:
        raise UserError("--masks applies to --to rosa only (our adapter stores its sparse structure)")
    base = None
    if args.base is not None:
        from .utils.model_loading import load_model

        base, _ = load_model(args.base)
    if args.to == "rosa":
        config = rf.convert_reference_to_rosa(args.src, args.out, masks=args.masks, base_model=base,
                                              overwrite=args.overwrite)
        print(f"wrote {args.out}: {len(config.target_modules)} layers, r={config.r}, density={config.density:g}")
    else:
        ref = rf.convert_rosa_to_reference(args.src, args.out, base_model=base, rosa_dtype=args.rosa_dtype,
                                           write_masks=args.write_masks, overwrite=args.overwrite)
        print(f"wrote {args.out}: {len(ref['target_modules'])} layers, r={ref['r']}, d={ref['d']:g}, "
              f"rosa_dtype={ref['rosa_dtype']}")
    return 0
