"""``python -m r2unet_fast.train`` (also under ``torchrun --nproc_per_node N -m r2unet_fast.train``)."""
from .cli import main

raise SystemExit(main())
