"""Whether a lesson may download from the model hub: never silently, never offline.

A few lesson cells use the real Stable Diffusion v1.5 (a download of hundreds of MB
to a few GB). They run by themselves on Colab and Kaggle, where a download is
expected and fast; on a laptop only when asked, with the environment variable
`SDSCRATCH_ONLINE=1`; and in both cases only if the hub answers within a few
seconds. `SDSCRATCH_ONLINE=0` turns them off everywhere, and `HF_HUB_OFFLINE=1`
(set by the course's tests) does too, since huggingface_hub would refuse anyway.

    from sdscratch.online import may_download

    access = may_download("SD v1.5's autoencoder (335 MB)")
    if access:
        ...  # download and run
    else:
        print(access.reason)  # one sentence: why the cell did nothing
"""

import os
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass

HUB = "https://huggingface.co"
SWITCH = "SDSCRATCH_ONLINE"  # "1": downloads allowed on this machine, "0": never


@dataclass(frozen=True)
class Access:
    """The answer of `may_download`: true or false, and why not.

    Attributes:
        allowed: the cell may download.
        reason: when not allowed, the one sentence the cell prints instead.
    """

    allowed: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.allowed


def notebook_service() -> bool:
    """True on Colab and Kaggle, where lessons download without being asked."""
    return "google.colab" in sys.modules or "KAGGLE_KERNEL_RUN_TYPE" in os.environ


def may_download(what="the real SD v1.5 weights (~2 GB)", timeout=3.0) -> Access:
    """Decide whether a lesson cell may download `what` from the hub.

    Args:
        what: what the cell downloads, with its size, for the sentence it prints.
        timeout: seconds to wait for the hub before giving up.
    Returns:
        An `Access`, true if allowed (on Colab or Kaggle, or with
        SDSCRATCH_ONLINE=1, and the hub answered); otherwise false, with the
        sentence to print.
    Raises:
        ValueError: SDSCRATCH_ONLINE is set to something other than 0 or 1.
    """
    switch = os.environ.get(SWITCH, "").strip()
    if switch not in ("", "0", "1"):
        raise ValueError(f"{SWITCH} must be 1 (allow downloads) or 0, not {switch!r}.")
    skipped = f"Skipped: this cell downloads {what}"
    if switch == "0":
        return Access(False, f"{skipped}, and {SWITCH}=0 turns downloads off.")
    if switch != "1" and not notebook_service():
        return Access(
            False, f"{skipped}; it runs on Colab/Kaggle, or locally with {SWITCH}=1."
        )
    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0"):
        return Access(False, f"{skipped}, and HF_HUB_OFFLINE is set here.")
    endpoint = os.environ.get("HF_ENDPOINT", HUB)  # a mirror, if the user set one
    if not reachable(endpoint, timeout):
        hint = ""
        if "KAGGLE_KERNEL_RUN_TYPE" in os.environ:  # Kaggle starts with it off
            hint = " (on Kaggle, switch Internet on in the notebook's settings)"
        return Access(
            False,
            f"{skipped}, and {endpoint} did not answer within {timeout:g} s{hint}.",
        )
    return Access(True)


def reachable(url: str, timeout: float) -> bool:
    """True if an HTTP(S) server answers at `url` within `timeout` seconds.

    Any answer counts, an error status too: the server is there. The request runs
    in a thread so that a slow name lookup cannot hold the caller longer either.
    """
    answered = []

    def probe():
        try:
            request = urllib.request.Request(url, method="HEAD")
            urllib.request.urlopen(request, timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:  # a status such as 404: the server answered
            answered.append(True)
        except (OSError, ValueError):  # refused, timed out, no such host, bad URL
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered) and answered[0]
