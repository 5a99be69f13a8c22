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
