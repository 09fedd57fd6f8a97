"""Shared test set-up: keep optional peers' import noise out of the output."""

import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
