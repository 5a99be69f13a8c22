// MathJax for the docstrings (pymdownx.arithmatex's "generic" output: \( \) and \[ \] in .arithmatex)
// and for the notebooks' Markdown cells (raw $ and $$, as Jupyter writes them). Code is never typeset.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
};
document$.subscribe(() => { MathJax.typesetPromise && MathJax.typesetPromise(); });
