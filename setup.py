"""slam-fairseq: SLAM as a fairseq plugin.

torch and fairseq are deliberately not in install_requires: pip would resolve torch to a CUDA build
of several GB and would pull fairseq's declared audio dependency, whose wheels cannot load beside
torch 2.13 CPU. ``scripts/install.sh`` installs both the safe way and keeps working installations.
"""
from setuptools import find_packages, setup

setup(
    name="slam-fairseq",
    version="0.1.0",
    description="SLAM speech-text jointly pre-trained Conformer encoder as a fairseq plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["slam_fairseq", "slam_fairseq.*", "slam_formats", "slam_formats.*",
                                    "manifests", "manifests.*"]),
    entry_points={"console_scripts": [
        "slam-fairseq-train = slam_fairseq.launch:main",
        "slam-fairseq-extract-features = slam_fairseq.feature_extraction.cli:main",
        "slam-prep-librispeech = manifests.prep_librispeech:cli",
        "slam-prep-librilight = manifests.prep_librilight:cli",
        "slam-prep-text = manifests.prep_text:cli",
        "slam-prep-covost2 = manifests.prep_covost2:cli",
        "slam-merge-manifests = manifests.merge_manifests:main",
    ]},
    install_requires=[
        "numpy>=1.21",
        "scipy",
        "pyyaml",
        "tqdm",
        "sentencepiece>=0.1.99",
        "soundfile>=0.12",
        "kaldi-native-fbank>=1.18",
        "editdistance",
        "sacrebleu>=2.0",
        "matplotlib",
        "tensorboardX>=2.6",  # fairseq's --tensorboard-logdir (pure Python + protobuf, no torch)
    ],
    extras_require={"test": ["pytest", "pytest-timeout"]},
)
