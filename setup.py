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
    "TensorFlow via Petastorm, MLflow",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["imageiq_spark", "imageiq_spark.*"]),
    package_data={"imageiq_spark": ["py.typed", "static/*.html", "log4j2.properties"]},
    install_requires=requirements("requirements.txt"),
    extras_require={"local": requirements("requirements-local.txt")},
    entry_points={"console_scripts": ["imageiq=imageiq_spark.cli:main"]},
)
