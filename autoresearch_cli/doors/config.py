"""Profiles and ar.toml: the constants that make runs comparable.

ar.toml is written once by `ar init` and edited by the human only. prepare.py (inside the
workspace) reads the [profile] table; the core reads everything.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import tomli_w

from autoresearch_cli.errors import ConfigError

CONFIG_NAME = "ar.toml"

# Each profile fixes what a comparison between experiments needs fixed: the tokenizer's
# vocabulary, the context length, the training budget and how many tokens the trusted
# evaluation scores. `micro` exists for tests and smoke runs (seconds, not minutes).
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {
        "vocab_size": 1024,  # small vocab: the embedding and head dominate tiny models
        "max_seq_len": 256,  # context length in tokens
        "time_budget": 60,  # training seconds, wall clock, excluding startup
        "eval_tokens": 32768,  # validation tokens the trusted evaluation scores
        "startup_allowance": 25,  # seconds on top of the budget before the hard kill
        "eval_timeout": 120,  # seconds the trusted evaluation may take
        "device": "auto",  # auto | cpu | cuda
    },
    "gpu": {
        "vocab_size": 8192,
        "max_seq_len": 2048,
        "time_budget": 300,
        "eval_tokens": 40 * 524288,  # ~21M tokens, as the original
        "startup_allowance": 120,
        "eval_timeout": 600,
        "device": "auto",
    },
    "micro": {
        "vocab_size": 512,
        "max_seq_len": 64,
        "time_budget": 3,
        "eval_tokens": 8192,
        "startup_allowance": 30,
        "eval_timeout": 60,
        "device": "cpu",
    },
}

PUBLIC_PROFILES = ("cpu", "gpu")
RULES = ("sequential", "one-run")  # [keep] rule: research/keeprule.py

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "source": "stdlib",
        "val_percent": 5,  # share of documents (by hash) in the validation split
        "holdout_percent": 5,  # share in the holdout split, never used for decisions
    },
    "sandbox": {
        "max_rss_mb": 8192,  # the job's control group's charge where there is one, else polled RSS/PSS
        "max_vram_mb": 0,  # 0: no cap beyond the device
        "max_file_mb": 2048,  # largest file a job may write
        "max_open_files": 4096,
        "network": False,  # False: cut the job off the network where the kernel allows
    },
    "agent": {
        "name": "random",  # random | llm
        "model": "",  # any litellm model string, e.g. anthropic/claude-sonnet-4-5
        "api_base": "",  # OpenAI-compatible server or Ollama
        "api_key_env": "",  # environment variable holding the key
        "repair_attempts": 1,  # follow-up proposals after a crash
        "temperature": 0.7,
        "max_output_tokens": 0,  # 0: litellm's limit for the model (at most 16384), else 12288
        "call_timeout_s": 300,  # one model call, streamed: the stream is closed at this limit
        "proposal_timeout_s": 900,  # all calls of one proposal, retries and follow-ups included
    },
    "keep": {
        # The keep test (research/keeprule.py). "sequential": a candidate's k-th run and the
        # best's k-th run share a seed; a one-sided paired t-test on their differences,
        # looked at after each pair from min_runs on. "one-run": one run decides.
        "rule": "sequential",
        "level": 0.05,  # the chance of keeping a change that is no better, at most
        "max_runs": 6,  # paired runs of one candidate at most (the first and confirmations)
        "min_runs": 2,  # paired runs before a keep: one run's luck is never kept
        "noise_runs": 5,  # runs of the first baseline, on seeds 0..4: the noise, and partners
        "best_runs": 2,  # runs of each new best at least (partners for the next candidates)
        "min_delta": -1.0,  # least improvement worth keeping; < 0: 0 (one-run: 2x baseline std)
        # A run that other processes left less than min_share of its cores, or that ran the
        # same code below min_throughput of its usual tokens/s, is set aside and run again.
        "min_share": 0.9,  # quiet runs here: 0.98-0.99; a busy process on 1 of 2 cores: 0.5
        "min_throughput": 0.7,
        "disturbed_retries": 2,
    },
}


def default_config(profile: str, tag: str, budget: int | None = None) -> dict[str, Any]:
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PUBLIC_PROFILES)}")
    if budget is not None and budget <= 0:
        raise ConfigError(f"budget must be a positive number of seconds, got {budget}")
    config = copy.deepcopy(DEFAULTS)
    config["profile"] = {"name": profile, **copy.deepcopy(PROFILES[profile])}
    if budget is not None:
        config["profile"]["time_budget"] = int(budget)
    config["workspace"] = {"tag": tag, "branch": f"autoresearch/{tag}"}
    return {key: config[key] for key in ("workspace", "profile", "data", "sandbox", "agent", "keep")}


# --- the typed settings the core reads ------------------------------------------------


@dataclass(frozen=True)
class Profile:
    name: str
    vocab_size: int
    max_seq_len: int
    time_budget: float
    eval_tokens: int
    startup_allowance: float
    eval_timeout: float
    device: str  # auto | cpu | cuda


@dataclass(frozen=True)
class DataSettings:
    source: str
    val_percent: int
    holdout_percent: int


@dataclass(frozen=True)
class SandboxSettings:
    max_rss_mb: float
    max_vram_mb: float
    max_file_mb: float
    max_open_files: int
    network: bool


@dataclass(frozen=True)
class AgentSettings:
    name: str
    model: str
    api_base: str
    api_key_env: str
    repair_attempts: int
    temperature: float
    max_output_tokens: int
    call_timeout_s: float
    proposal_timeout_s: float


@dataclass(frozen=True)
class KeepSettings:
    rule: str
    level: float
    max_runs: int
    min_runs: int
    noise_runs: int
    best_runs: int
    min_delta: float
    min_share: float
    min_throughput: float
    disturbed_retries: int


@dataclass(frozen=True)
class Settings:
    """ar.toml, checked and typed: what every command reads."""

    tag: str
    branch: str
    profile: Profile
    data: DataSettings
    sandbox: SandboxSettings
    agent: AgentSettings
    keep: KeepSettings


def _typed(kind: type, table: dict[str, Any]) -> Any:
    names = {f.name for f in fields(kind)}
    return kind(**{key: value for key, value in table.items() if key in names})


def with_keep(settings: Settings, **changes: Any) -> Settings:
    """`settings` with some [keep] values changed (what a human would write in ar.toml)."""
    return replace(settings, keep=replace(settings.keep, **changes))


def settings_of(config: dict[str, Any]) -> Settings:
    """The typed view of a checked ar.toml dict."""
    workspace = config["workspace"]
    return Settings(
        tag=str(workspace.get("tag", "run")), branch=str(workspace["branch"]),
        profile=_typed(Profile, config["profile"]), data=_typed(DataSettings, config["data"]),
        sandbox=_typed(SandboxSettings, config["sandbox"]),
        agent=_typed(AgentSettings, config["agent"]), keep=_typed(KeepSettings, config["keep"]),
    )


def dumps(config: dict[str, Any]) -> str:
    header = "# ar workspace settings: edited by the human, never by an agent.\n"
    return header + tomli_w.dumps(config)


def write(path: Path, config: dict[str, Any]) -> None:
    path.write_text(dumps(config))


def load(path: Path) -> Settings:
    """ar.toml, checked, with defaults for what it does not say, as typed settings."""
    return settings_of(load_raw(path))


def load_raw(path: Path) -> dict[str, Any]:
    """Read ar.toml and fill in defaults for tables or keys it does not have (checked)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read: {exc}") from None
    try:
        loaded = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    if "profile" not in loaded or "name" not in loaded["profile"]:
        raise ConfigError(f"{path} has no [profile] table with a name")
    name = loaded["profile"]["name"]
    base = default_config(name if name in PROFILES else "cpu", loaded.get("workspace", {}).get("tag", "run"))
    for table, values in loaded.items():
        if isinstance(values, dict):
            base.setdefault(table, {}).update(values)
        else:
            base[table] = values
    _check(base, path)
    return base


def _check(config: dict[str, Any], path: Path) -> None:
    profile = config["profile"]
    for key in ("vocab_size", "max_seq_len", "time_budget", "eval_tokens", "startup_allowance",
                "eval_timeout"):
        value = profile.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{path}: [profile] {key} must be a positive number, got {value!r}")
    if profile["vocab_size"] > 65536:
        raise ConfigError(f"{path}: [profile] vocab_size {profile['vocab_size']} does not fit uint16 tokens")
    if profile.get("device", "auto") not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{path}: [profile] device must be auto, cpu or cuda")
    _check_keep(config["keep"], path)
    agent = config["agent"]
    if not isinstance(agent.get("repair_attempts"), int) or agent["repair_attempts"] < 0:
        raise ConfigError(f"{path}: [agent] repair_attempts must be an integer of at least 0, "
                          f"got {agent.get('repair_attempts')!r}")


def _check_keep(keep: dict[str, Any], path: Path) -> None:
    if keep.get("rule") not in RULES:
        raise ConfigError(f"{path}: [keep] rule must be one of {', '.join(RULES)}, got {keep.get('rule')!r}")
    if not isinstance(keep.get("level"), int | float) or not 0 < keep["level"] < 1:
        raise ConfigError(f"{path}: [keep] level must be between 0 and 1, got {keep.get('level')!r}")
    for key, least in (("max_runs", 1), ("min_runs", 1), ("noise_runs", 1), ("best_runs", 1),
                       ("disturbed_retries", 0)):
        if not isinstance(keep.get(key), int) or keep[key] < least:
            raise ConfigError(f"{path}: [keep] {key} must be an integer of at least {least}, "
                              f"got {keep.get(key)!r}")
    for key in ("min_share", "min_throughput"):
        if not isinstance(keep.get(key), int | float) or not 0 <= keep[key] <= 1:
            raise ConfigError(f"{path}: [keep] {key} must be between 0 and 1, got {keep.get(key)!r}")
    if keep["min_runs"] > keep["max_runs"]:
        raise ConfigError(f"{path}: [keep] min_runs ({keep['min_runs']}) must not exceed "
                          f"max_runs ({keep['max_runs']})")
    if not isinstance(keep.get("min_delta"), int | float):
        raise ConfigError(f"{path}: [keep] min_delta must be a number, got {keep.get('min_delta')!r}")
