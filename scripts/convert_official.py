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

import sys

from simmim_hf.publish.official import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], description=__doc__))
