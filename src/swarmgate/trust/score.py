"""A device's trust score: one number in [0, 1] from what the gateway has seen of it.

    trust = 0.40 * reliability + 0.15 * tenure + 0.30 * canaries + 0.15 * attested
            - 0.10 * suspicions, clamped to [0, 1]

    reliability = served / (served + failed + 5)      jobs it finished vs. failed; the
                                                      5 phantom failures make a newcomer
                                                      earn it (100 jobs: 0.95)
    tenure      = min(1, days since registration / 30)
    canaries    = passed / (passed + 10 * failed + 2) known-answer checks; a failure
                                                      weighs ten passes
    attested    = 1 with a valid integrity attestation (or an admin's word), else 0

``trusted_only`` requests need a score above 0.8: an unattested device gets there only
with a long clean record (about 30 days, hundreds of jobs, a dozen canaries), an
attested one somewhat sooner. Suspicions (``SUSPICIONS``) cost 0.1 each, and at
``SUSPEND_AT`` the device is paused for routing until an admin clears it.
"""

from __future__ import annotations

from swarmgate.routing.profile import DeviceProfile

TENURE_FULL_DAYS = 30.0
SUSPEND_AT = 3
# Reasons a device is suspected, in the manner of AI Horde's worker suspicion.
SUSPICIONS = {
    "too_fast": "reported more tokens per second than the model can plausibly produce",
    "aborted_jobs": "failed too many jobs in a row after accepting them",
    "canary_failed": "answered a known-answer check differently from the reference",
}


def trust_score(profile: DeviceProfile, now_unix: float) -> float:
    served, failed = profile.jobs_served, profile.jobs_failed
    reliability = served / (served + failed + 5)
    days = max(0.0, now_unix - profile.registered_at) / 86_400 if profile.registered_at else 0.0
    tenure = min(1.0, days / TENURE_FULL_DAYS)
    passed, flunked = profile.canaries_passed, profile.canaries_failed
    canaries = passed / (passed + 10 * flunked + 2)
    attested = 1.0 if profile.verified else 0.0
    score = (
        0.40 * reliability
        + 0.15 * tenure
        + 0.30 * canaries
        + 0.15 * attested
        - 0.10 * profile.suspicions
    )
    return round(min(1.0, max(0.0, score)), 4)
