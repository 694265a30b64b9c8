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
    },
    entry_points={"console_scripts": ["tinyllm = tinyllm.cli:main"]},
)
