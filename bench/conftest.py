"""Shared by the benchmark suites: the versions and device each result was measured with."""
import os
import shutil
import subprocess


def pytest_benchmark_update_machine_info(config, machine_info):
    """Stored in the --benchmark-json file; bench/report.py prints it above the tables."""
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    fastfoof_info = {
        "torch": torch.__version__,
        "triton": triton_version,
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda_runtime": torch.version.cuda,
        "driver": None,
        "bench_smoke": os.environ.get("FASTFOOF_BENCH_SMOKE") == "1",
    }
    if torch.cuda.is_available() and shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, check=False)
        fastfoof_info["driver"] = query.stdout.strip().splitlines()[0] if query.stdout.strip() else None
    machine_info["fastfoof"] = fastfoof_info
