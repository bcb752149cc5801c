"""``python -m autoprune``, and ``torchrun --nproc-per-node N -m autoprune``: one rank each."""

from .cli import main
from .distributed import torchrun_session

with torchrun_session():
    main()
