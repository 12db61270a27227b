"""``python -m r2unet_fast.ablate``."""
from .cli import main

raise SystemExit(main())
