# All metadata is in pyproject.toml; this file lets older tools run `python setup.py ...`.
from setuptools import setup

setup()
