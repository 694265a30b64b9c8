from setuptools import find_packages, setup

setup(
    name="tinyllm",
    version="0.1.0",
    description="A GPT language model built from first principles on NumPy/CuPy",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["tinyllm", "tinyllm.*"]),
    install_requires=["numpy>=1.22", "regex"],
    extras_require={
        "gpu": ["cupy-cuda12x"],
        "test": ["pytest", "hypothesis"],
        "plot": ["matplotlib"],
        # optional cross-checks the tests run when present: our safetensors files read by the
        # reference library, our GPT-2 tokenizer against tiktoken, plots drawn
        "check": ["safetensors", "tiktoken", "matplotlib"],
        # data parallelism over processes and machines (tinyllm.parallel, `tinyllm train --nproc N`):
        # mpi4py with an MPI implementation from the package registry (its mpiexec included), so
        # that a fresh machine needs no system MPI. Open MPI on Linux and macOS, Intel MPI on Windows.
        "mpi": ["mpi4py>=4", "openmpi; sys_platform != 'win32'", "impi-rt; sys_platform == 'win32'"],
    },
    entry_points={"console_scripts": ["tinyllm = tinyllm.cli:main"]},
)
