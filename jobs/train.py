"""Ray job entrypoint: train one FLUX LoRA (`fluxray train`'s arguments; `-v` shows every library's output).

    ray job submit --working-dir . -- python jobs/train.py --config configs/tiny.yaml
    ray job submit --working-dir . -- python jobs/train.py --config configs/flux-dev.yaml --set train.steps=1500

Runs against the cluster the job was submitted to, or a local one when none is running.
"""

import sys
from pathlib import Path

# `python jobs/train.py` puts jobs/ on sys.path; the package sits beside it in the working dir.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fluxray.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    verbose = [a for a in args if a in ("-v", "--verbose")]  # an option of `fluxray` itself
    sys.exit(main([*verbose, "train", *[a for a in args if a not in verbose]]))
