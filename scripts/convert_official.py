#!/usr/bin/env python
"""Official microsoft/SimMIM checkpoint -> Hugging Face folders.

    python scripts/convert_official.py simmim_pretrain__vit_base__img224__800ep.pth --output_dir converted/vit-b
    python scripts/convert_official.py swin_base_192.pth --output_dir converted/swin-b --preset swin-base-window6-192
    python scripts/convert_official.py finetuned.pth --output_dir converted/cls --config_overrides num_attention_heads=12
    python scripts/convert_official.py --config convert.yaml     # the same arguments (`checkpoint: ...` too) from a file

A pretraining checkpoint becomes a SimMIM checkpoint (continue pretraining with `scripts/pretrain.py
--model_name_or_path DIR`) plus the stock encoder in `DIR/encoder`; a fine-tuned one becomes a stock
`BeitForImageClassification` / `SwinForImageClassification` folder. The checkpoint is read without executing pickled
code. Input mistakes (unreadable checkpoint, contradicting overrides, a bad config file) exit with status 2 and write
nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simmim_hf.cli import parse_script_arguments
from simmim_hf.errors import UsageError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="official .pth file (pretraining or fine-tuned)")
    parser.add_argument("--output_dir", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument("--preset", default=None, help="preset for what the tensors do not determine")
    parser.add_argument(
        "--config_overrides", default=None, help='"key=value,..." SimMIM or encoder fields (JSON values)'
    )
    return parse_script_arguments(parser, argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Imported after parsing so that --help stays fast.
    from simmim_hf.pretrain.arguments import parse_overrides
    from simmim_hf.publish.official import convert_official

    output_dir = Path(args.output_dir)
    try:
        if output_dir.exists() and any(output_dir.iterdir()):
            raise UsageError(f"--output_dir {output_dir}: exists and is not empty")
        overrides = parse_overrides(args.config_overrides)
        # Everything is read and checked in memory before the first file is written.
        convert_official(args.checkpoint, output_dir, preset=args.preset, **overrides)
    except (UsageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
