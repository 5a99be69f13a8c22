"""Test configuration.

float64 is enabled for the whole run so exactness tests can compare against
oracles at tight tolerances; float32 stability tests build float32 arrays
explicitly (computation then stays in float32).

Do not import ssmjax at module level here: jaxtyping's import hook
(``--jaxtyping-packages`` in pyproject.toml) must be installed first so the
package's shape annotations are checked during the tests.
"""

import jax

jax.config.update("jax_enable_x64", True)

# The README's test command runs the suite under pytest-xdist with ``--dist loadfile``: each
# file goes whole to one worker, in collection order. The longest files are collected first so
# that no worker is left running one of them alone at the end (longest-first scheduling).
# Order within a file is unchanged (the sort is stable).
_LONGEST_FILES_FIRST = (
    "test_notebooks.py",
    "test_kvae.py",
    "test_lgssm_parallel.py",
    "test_lgssm_fit.py",
    "test_lgssm_inference.py",
    "test_lgssm_joint.py",
    "test_hmm_parallel.py",
    "test_hmm_fit.py",
    "test_cli_fit.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
