"""The AWS CLI in its own virtualenv (bench/.venv-aws), created on demand.

awscli pins botocore versions that conflict with aioboto3's pin, so it never goes into .venv.
"""

import os
import subprocess
import sys
import venv

from bench.config import BENCH

VENV = BENCH / ".venv-aws"
AWS = VENV / "bin" / "aws"
REQUIREMENT = "awscli>=1.33"


def ensure() -> str:
    if not AWS.exists():
        from bench.stack import log

        log(f"creating {VENV} with {REQUIREMENT} (once)")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "--quiet", REQUIREMENT],
            check=True,
            stdout=sys.stderr,
        )
    return str(AWS)


def env(base: dict[str, str]) -> dict[str, str]:
    """Dummy credentials for the emulator; no user config or profile leaks in."""
    return {
        **base,
        "AWS_ACCESS_KEY_ID": base.get("AWS_ACCESS_KEY_ID", "ferry-dev"),
        "AWS_SECRET_ACCESS_KEY": base.get("AWS_SECRET_ACCESS_KEY", "ferry-dev-secret"),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_PAGER": "",
    }


def version() -> str:
    done = subprocess.run([ensure(), "--version"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().split(" ")[0]
