"""Settings from the environment and the .env file (DESIGN §2)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from dotenv import dotenv_values

from .errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

DEFAULTS = {
    "DB_HOST": "localhost",
    "DB_PORT": "5432",
    "DB_USER": "postgres",
    "BACKUP_DIR": "./backups",
    "LOG_DIR": "./logs",
    # MIGRATIONS_DIR, REPO_PATH and CONFIG_DIR have no default: the toolkit never falls back to its
    # own folder, repository or sample migrations (DESIGN §2); a command that needs one names it.
    "CODE_BACKUP_DIR": "./code_backups",
    "CONFIG_BACKUP_DIR": "./config_backups",
    "ENV_FILE": ".env",
}

EXAMPLES = {
    "V2_DATABASE_URL": "postgresql://user:password@prod-host:5432/v2",
    "STAGING_DATABASE_URL": "postgresql://user:password@staging-host:5432/staging",
    "DB_NAME": "staging",
    "MIGRATIONS_DIR": "/srv/app/migrations",
    "REPO_PATH": "/srv/app",
    "CONFIG_DIR": "/srv/app/config",
}
# Settings a command needs that have no default: what they are for, for the message naming them.
NEEDED = {"MIGRATIONS_DIR": "the folder of your SQL migrations (the toolkit's examples/migrations/ are samples for the demo)",
          "REPO_PATH": "your application's git repository (never the toolkit's own)",
          "CONFIG_DIR": "your application's configuration folder"}


@dataclass
class Settings:
    """Variables as the scripts see them: the environment over the .env file over defaults."""

    values: Mapping[str, str]
    env_file: Path
    env_file_found: bool = False
    overrides: dict = field(default_factory=dict)

    def get(self, name: str) -> Optional[str]:
        if name in self.overrides and self.overrides[name] is not None:
            return self.overrides[name]
        value = self.values.get(name)
        if value in (None, ""):
            return DEFAULTS.get(name)
        return value

    def require(self, name: str) -> str:
        value = self.get(name)
        if not value:
            example = EXAMPLES.get(name, "...")
            what = f" ({NEEDED[name]})" if name in NEEDED else ""
            raise ConfigError(
                f"{name} is not set{what}. Add a line like\n    {name}={example}\n"
                f"to {self.env_file} or export it in the environment. Nothing was changed."
            )
        return value

    def path(self, name: str) -> Path:
        """A folder or file setting; relative values are taken from the toolkit folder."""
        value = self.require(name)
        p = Path(value).expanduser()
        return p if p.is_absolute() else (PROJECT_ROOT / p).resolve()

    @property
    def backup_dir(self) -> Path:
        return self.path("BACKUP_DIR")

    @property
    def log_dir(self) -> Path:
        return self.path("LOG_DIR")


def load_settings(environ: Optional[Mapping[str, str]] = None, **overrides: Optional[str]) -> Settings:
    """Read $ENV_FILE (default ./.env in the toolkit folder); real environment variables win."""
    environ = dict(os.environ if environ is None else environ)
    env_file = Path(environ.get("ENV_FILE") or DEFAULTS["ENV_FILE"]).expanduser()
    if not env_file.is_absolute():
        env_file = PROJECT_ROOT / env_file
    file_values: dict = {}
    found = env_file.is_file()
    if found:
        try:
            file_values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
        except OSError as exc:
            raise ConfigError(f"cannot read {env_file}: {exc.strerror}") from exc
    merged = {**file_values, **{k: v for k, v in environ.items() if v != ""}}
    return Settings(values=merged, env_file=env_file, env_file_found=found,
                    overrides={k: v for k, v in overrides.items() if v is not None})
