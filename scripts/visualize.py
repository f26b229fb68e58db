#!/usr/bin/env python
"""Pictures of a model on your images, as a PNG: SimMIM reconstructions, or feature pictures of any encoder.

python scripts/visualize.py runs/demo img1.png img2.jpg --output recon.png [--mask_ratio 0.6] [--seed 0]
python scripts/visualize.py --features pca runs/demo/encoder img1.png            # any AutoModel folder or Hub id
python scripts/visualize.py --features attention google/vit-base-patch16-224 img1.png   # ViT/DeiT/BEiT
python scripts/visualize.py --config grid.yaml     # the same arguments (`checkpoint:`, `images:` too) from a file
"""

from simmim_hf.cli import run_script
from simmim_hf.eval.visualize import load_pixels, main, parse_args  # noqa: F401  (tests read them here)

if __name__ == "__main__":
    run_script(main)
