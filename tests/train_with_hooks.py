"""train_ddpm.py with two test-only hooks, for the multi-process tests (a torchrun worker cannot be monkeypatched from
the test): SLOW_CACHE_S=N makes every dataset cache build N seconds slower, and every process prints the global step
at which it saves each checkpoint ("process 1 saves checkpoint-step-6 at global step 6")."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset  # noqa: E402
import train_ddpm  # noqa: E402

build_cache, save_checkpoint = dataset.build_cache, train_ddpm.save_checkpoint


def slow_build_cache(*args, **kwargs):
    time.sleep(float(os.environ.get("SLOW_CACHE_S", 0)))
    return build_cache(*args, **kwargs)


def reporting_save_checkpoint(accelerator, output_dir, name, progress, *args, **kwargs):
    print(f"process {accelerator.process_index} saves {name} at global step {progress.global_step}", flush=True)
    return save_checkpoint(accelerator, output_dir, name, progress, *args, **kwargs)


dataset.build_cache, train_ddpm.save_checkpoint = slow_build_cache, reporting_save_checkpoint
sys.exit(train_ddpm.main())
