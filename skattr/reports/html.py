"""Render the main job's sections as ``report.md`` and one self-contained ``report.html``.

The HTML page embeds every figure as a base64 PNG (``data:`` URL), so the file alone is the
report; the markdown beside it links the PNG files by relative path.
"""

from __future__ import annotations

import base64
import html
import os

__all__ = ["GLOSSARY", "write_report", "render_markdown", "render_html"]

#: Every abbreviation the report uses, explained once.
GLOSSARY = [
    ("eNTK", "empirical neural tangent kernel: inner products of the network's output gradients "
             "with respect to its parameters, between two inputs."),
    ("trNTK", "trace NTK: the sum over output classes of the eNTK (cosine-normalised)."),
    ("pNTK", "pseudo NTK: the eNTK of the summed outputs (cosine-normalised)."),
    ("eNTK (full)", "the whole C x C eNTK, a kernel on (sample, class) pairs."),
    ("proj-trNTK, proj-pNTK", "the same kernels from gradients randomly projected to k "
                              "dimensions (k = projection_dim)."),
    ("embedding", "cosine similarity of the last hidden layer's activations."),
    ("Grad-Cos", "cosine similarity of per-example loss gradients."),
    ("surrogate", "a kernel machine fitted on a kernel to imitate the network's own predictions."),
    ("kGLM", "kernel generalised linear model: logistic regression on the kernel matrix, "
             "trained by SGD (the eNTK paper's surrogate)."),
    ("KLR", "kernel logistic regression: the same model solved to convergence (L-BFGS)."),
    ("SVC", "support-vector classifier on the precomputed kernel."),
    ("KRR", "kernel ridge regression of the network's logits."),
    ("tau (τ)", "Kendall rank correlation, over test points, between the network's and the "
                "surrogate's probability of the true class (1 = same ordering)."),
    ("acc. diff", "surrogate test accuracy minus network test accuracy."),
    ("TRAK", "tracing with the randomly projected after kernel: attribution from projected "
             "gradients of one or several (TRAK-M: M) models."),
    ("LDS", "linear datamodeling score: Spearman correlation, over models retrained on random "
            "halves of the training set, between the sum of a method's attributions over each "
            "half and that model's output on a test point; mean over test points."),
    ("TracIn", "sum over training checkpoints of learning rate x test gradient . training "
               "gradient."),
    ("IF", "influence function: test gradient . (Hessian + damping)^-1 . training gradient; "
           "solvers CG (conjugate gradient), EK-FAC (eigenvalue-corrected Kronecker factors), "
           "exact."),
    ("HYDRA", "hypergradient data relevance: the derivative of the trained weights with "
              "respect to each example's loss weight, carried through the SGD run."),
    ("self-influence", "a method's score of a training example on itself; flipped labels score "
                       "high."),
    ("AUC", "area under the ROC curve of a suspicion ranking against the flipped labels "
            "(0.5 = chance)."),
    ("SGLD", "stochastic gradient Langevin dynamics: noisy SGD sampling weights near the "
             "trained ones."),
    ("ARI", "adjusted Rand index between a clustering and the true groups (1 = identical, "
            "0 = chance)."),
    ("MLP, CNN", "multilayer perceptron (fully connected network); convolutional network."),
]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:0.2em} h2{border-bottom:1px solid #ccc;padding-bottom:0.2em;margin-top:2em}
.meta{color:#666;font-size:0.9em}
table{border-collapse:collapse;margin:0.6em 0 1.2em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:left}
th{background:#f0f0f0} tr:nth-child(even) td{background:#fafafa}
caption{caption-side:top;text-align:left;font-weight:600;padding-bottom:0.3em}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#444;font-size:0.9em}
.summary li{margin-bottom:0.3em} .what{font-style:italic}
table.glossary td:first-child{font-weight:600;white-space:nowrap}
nav a{margin-right:1em}
"""


def _esc(s):
    return html.escape(str(s), quote=True)


def _md_cell(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def _networks(sections):
    return [(s.title, name, acc) for s in sections for name, acc in s.networks]


def render_markdown(sections, meta, root):
    """The report as markdown; figures linked relative to ``root`` (the folder of report.md)."""
    lines = ["# skattr report", "", meta, "", "## Summary", ""]
    nets = _networks(sections)
    if nets:
        lines += ["Networks trained (accuracy on held-out test digits unless the name says otherwise):", ""]
        lines += [f"- {name} ({title}): {acc:.3f}" for title, name, acc in nets]
        lines.append("")
    for s in sections:
        for sentence in s.summary:
            lines.append(f"- **{s.title}.** {sentence}")
    lines += ["", "Sections: " + ", ".join(f"[{s.title}](#{s.name})" for s in sections)
              + "; every abbreviation is explained in the [glossary](#glossary) at the end.", ""]
    for s in sections:
        lines += [f'<a id="{s.name}"></a>', "", f"## {s.title}", "", f"*{s.what}*", ""]
        for b in s.blocks:
            if b[0] == "text":
                lines += [b[1], ""]
            elif b[0] == "table":
                _, caption, header, rows = b
                lines += [f"**{caption}**", "", "| " + " | ".join(map(_md_cell, header)) + " |",
                          "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
                lines.append("")
            else:
                _, path, caption = b
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                lines += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
        if s.seconds is not None:
            lines += [f"(section run time {s.seconds:.0f} s)", ""]
    lines += ['<a id="glossary"></a>', "", "## Glossary", "", "| term | meaning |", "|---|---|"]
    lines += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in GLOSSARY]
    return "\n".join(lines) + "\n"


def _img(path):
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f"data:image/png;base64,{data}"


def render_html(sections, meta):
    """The report as one HTML page with every figure embedded."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>skattr report</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>skattr report</h1>", f'<p class="meta">{_esc(meta)}</p>',
           "<nav>" + "".join(f'<a href="#{_esc(s.name)}">{_esc(s.title)}</a>' for s in sections)
           + '<a href="#glossary">Glossary</a></nav>',
           '<h2 id="summary">Summary</h2>']
    nets = _networks(sections)
    if nets:
        out.append("<table><caption>Networks trained (accuracy on held-out test digits unless the "
                   "name says otherwise)</caption>"
                   "<tr><th>network</th><th>section</th><th>accuracy</th></tr>")
        out += [f"<tr><td>{_esc(n)}</td><td>{_esc(t)}</td><td>{a:.3f}</td></tr>" for t, n, a in nets]
        out.append("</table>")
    out.append('<ul class="summary">')
    for s in sections:
        for sentence in s.summary:
            out.append(f'<li><a href="#{_esc(s.name)}"><b>{_esc(s.title)}.</b></a> {_esc(sentence)}</li>')
    out.append("</ul>")
    out.append('<p>Every abbreviation is explained in the <a href="#glossary">glossary</a> at the end.</p>')
    for s in sections:
        out += [f'<h2 id="{_esc(s.name)}">{_esc(s.title)}</h2>', f'<p class="what">{_esc(s.what)}</p>']
        for b in s.blocks:
            if b[0] == "text":
                out.append(f"<p>{_esc(b[1])}</p>")
            elif b[0] == "table":
                _, caption, header, rows = b
                out.append(f"<table><caption>{_esc(caption)}</caption><tr>"
                           + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            else:
                _, path, caption = b
                out.append(f'<figure><img src="{_img(path)}" alt="{_esc(caption)}">'
                           f"<figcaption>{_esc(caption)}</figcaption></figure>")
        if s.seconds is not None:
            out.append(f'<p class="meta">section run time {s.seconds:.0f} s</p>')
    out.append('<h2 id="glossary">Glossary</h2><table class="glossary"><tr><th>term</th><th>meaning</th></tr>')
    out += [f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in GLOSSARY]
    out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(sections, meta, outdir):
    """Write ``report.md`` and ``report.html`` to ``outdir``; return their paths.

    Examples
    --------
    >>> import tempfile
    >>> from skattr.reports.document import Section
    >>> s = Section("demo", "Demo", "A demonstration.")
    >>> s.summary.append("Nothing measured.")
    >>> s.table("numbers", ["a", "b"], [[1, 2]])
    >>> d = tempfile.mkdtemp()
    >>> md, page = write_report([s], "seed 0", d)
    >>> "<td>1</td>" in open(page).read()
    True
    """
    os.makedirs(outdir, exist_ok=True)
    md = os.path.join(outdir, "report.md")
    page = os.path.join(outdir, "report.html")
    with open(md, "w", encoding="utf-8") as f:
        f.write(render_markdown(sections, meta, outdir))
    with open(page, "w", encoding="utf-8") as f:
        f.write(render_html(sections, meta))
    return md, page
