from setuptools import find_packages, setup

setup(
    name="megatron_lora",
    version="0.1.0",
    description="Exact LoRA for megatron-core models under tensor, sequence and expert parallelism",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_lora", "megatron_lora.*"]),
    python_requires=">=3.10",
    install_requires=[
        # install the CPU or CUDA build of torch you want first; any 2.4+ satisfies this
        "torch>=2.4",
        # the release lines megatron_lora.cpu is tested on (0.17+ need Python 3.12)
        "megatron-core>=0.16,<0.20",
        # megatron's dist-checkpointing writer process needs it to save any checkpoint
        "psutil>=5.9",
        "pyyaml>=6",
        # time-limited matching of regexes from files and flags (timeout=); transformers needs it too
        "regex>=2022.1.18",
        "safetensors>=0.4",
        # a Hugging Face model's own tokenizer (AutoTokenizer, local files only) and the
        # export-hf / generate.py borders
        "transformers>=4.45",
        # the main job (scripts/demo.py) makes its tokenizer with tokenizers and serves the
        # adapter through peft, as its users do
        "tokenizers>=0.19",
        "peft>=0.13",
        "numpy",
        # the training scripts: progress bar, TensorBoard events, the loss-curve PNG
        "tqdm>=4.60",
        "tensorboard>=2.10",
        "matplotlib>=3.5",
    ],
    entry_points={"console_scripts": ["megatron-lora=megatron_lora.cli:main"]},
    extras_require={
        # transformers + peft: the interop tests check exports against the real libraries
        # tensorboard: the resume test reads the events back
        "test": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.45", "peft>=0.13",
                 "tensorboard>=2.14"],
        "te": ["transformer-engine[pytorch]"],
    },
)
