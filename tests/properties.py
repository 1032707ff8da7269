"""How hard the property tests try.

Under hypothesis' default profile (`./run.sh test`, CI) a property runs the examples it
names; under `--hypothesis-profile=quick`, the edit loop's, a fifth of them.
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("quick", max_examples=20)


def examples(count: int) -> settings:
    """`count` examples under the default profile (100 examples), scaled by the loaded one."""
    scaled = round(count * settings.default.max_examples / 100)
    return settings(max_examples=max(10, scaled), deadline=None)
