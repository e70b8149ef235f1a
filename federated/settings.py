"""Settings of one federated run, validated once and carried as Flower run config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from federated.errors import InvalidFederatedConfig

# A simulated hospital holds a few rows (breast-cancer split 100 ways: about 4 each), so
# one local epoch is one or two SGD steps and FedAvg stays far from the pooled model
# (0.945 of centralized accuracy at 100 clients x 10 rounds); 20 local epochs reach 0.99.
SIMULATION_LOCAL_EPOCHS = 20


class RunSettings(BaseModel):
    """Everything the ServerApp needs; clients receive their part in each round's config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(10, ge=1, le=10_000)
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(0.1, ge=0.0)
    model: Literal["logreg", "mlp"] = "logreg"
    hidden: int = Field(32, ge=1, le=4096)
    local_epochs: int = Field(1, ge=1, le=1000)
    learning_rate: float = Field(0.1, gt=0.0)
    batch_size: int = Field(32, ge=1)
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0)
    min_nodes: int = Field(2, ge=1)
    seed: int = 0
    standardize: bool = True  # federation-wide feature scaling from per-hospital sums

    secagg: bool = False
    secagg_num_shares: float = Field(1.0, gt=0.0)
    secagg_threshold: float = Field(0.6, gt=0.0)
    secagg_max_weight: float = Field(1000.0, gt=0.0)
    secagg_clipping_range: float = Field(16.0, gt=0.0)
    secagg_timeout: float = Field(0.0, ge=0.0)  # 0 waits for every reply

    dp: bool = False
    dp_noise_multiplier: float = Field(1.0, ge=0.0)
    dp_clipping_norm: float = Field(1.0, gt=0.0)
    dp_delta: float = Field(1e-5, gt=0.0, lt=1.0)

    eval_data: str = ""  # Parquet file of held-out rows, read by the server only
    report_path: str = ""  # where the ServerApp writes its part of the report
    round_timeout: float = Field(600.0, gt=0.0)
    node_wait_timeout: float = Field(120.0, gt=0.0)

    @model_validator(mode="after")
    def _check_combination(self) -> RunSettings:
        if self.secagg and self.min_nodes < 3:
            # SecAgg+ masks need several neighbours; two would reveal each other's input.
            raise ValueError("secure aggregation needs min_nodes >= 3")
        if self.secagg_num_shares > 1 and self.secagg_num_shares != int(self.secagg_num_shares):
            raise ValueError("secagg_num_shares is a fraction (<= 1) or a whole count")
        if self.secagg_threshold > 1 and self.secagg_threshold != int(self.secagg_threshold):
            raise ValueError("secagg_threshold is a fraction (<= 1) or a whole count")
        return self

    @classmethod
    def build(cls, **values: Any) -> RunSettings:
        """Validate `values`, raising `InvalidFederatedConfig` with the field names."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise InvalidFederatedConfig(_describe(exc)) from exc

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunSettings:
        """Read Flower's run config (kebab-case keys); unknown keys are refused."""
        return cls.build(**{k.replace("-", "_"): v for k, v in run_config.items()})

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Kebab-case keys, as written under `[tool.flwr.app.config]`."""
        return {k.replace("_", "-"): v for k, v in self.model_dump().items()}

    def replace(self, **changes: Any) -> RunSettings:
        return RunSettings.build(**{**self.model_dump(), **changes})


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "settings"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
