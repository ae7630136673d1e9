"""Layer inputs and output gradients of a training step, read off its own forward and backward pass.

:class:`LayerCapture` hooks named modules: a forward hook keeps each call's input (detached) and
registers a tensor hook on its output that keeps the gradient arriving there in the backward
pass.  For a Linear / Conv layer these two factors make every example's gradient of the layer's
weight (``grad W_j = delta_j^T a_j``), so per-example gradients cost no second pass.  Used by
HYDRA (:class:`skattr.hypergradients.BatchCapture`) and representation tracing
(:class:`skattr.tracing.RepresentationRecorder`).

In-place safety, two ways:

* ``clone_output=True``: the hook returns a clone of the output, which goes on through the
  network; an in-place activation after the layer then modifies the clone, not the tensor
  whose gradient is hooked.
* :attr:`LayerCall.input_modified`: the version counter of the captured input, compared with
  the one it had at capture time (an in-place operation after the layer changed the saved
  input).
"""

from __future__ import annotations

__all__ = ["LayerCall", "LayerCapture"]


class LayerCall:
    """One call of a captured layer: its input and the gradient at its output.

    Attributes
    ----------
    input : tensor
        The layer's first positional input, detached (shares its storage).
    grad : tensor or None
        The gradient of the loss at the layer's output (``None`` until the backward pass
        reaches it, or if the output did not require a gradient).
    """

    __slots__ = ("input", "grad", "_version")

    def __init__(self, inp):
        self.input = inp.detach()
        self._version = inp._version
        self.grad = None

    def _save(self, g):
        self.grad = g.detach()

    @property
    def input_modified(self):
        """Whether the input was changed in place after the layer read it."""
        return self.input._version != self._version


class LayerCapture:
    """Inputs and output gradients of named modules during the passes between :meth:`begin`
    and :meth:`end`.

    Parameters
    ----------
    modules : dict {name: nn.Module}
        The captured layers.
    clone_output : bool, default=False
        Return a clone of each captured output from the hook (see the module docstring).

    Examples
    --------
    >>> import torch
    >>> fc = torch.nn.Linear(3, 2)
    >>> cap = LayerCapture({"fc": fc}).install()
    >>> cap.begin()
    >>> fc(torch.ones(4, 3)).sum().backward()
    >>> (call,) = cap.end()["fc"]
    >>> call.input.shape, call.grad.shape
    (torch.Size([4, 3]), torch.Size([4, 2]))
    >>> cap.remove()
    """

    def __init__(self, modules, *, clone_output=False):
        self.modules = dict(modules)
        self.clone_output = bool(clone_output)
        self.handles = []
        self.active = False
        self.calls = {}

    def install(self):
        """Register the forward hooks (once); returns ``self``."""
        if not self.handles:
            self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def remove(self):
        """Remove the hooks."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self.active = False

    def begin(self):
        """Start capturing (forgets earlier calls)."""
        self.calls = {n: [] for n in self.modules}
        self.active = True

    def end(self):
        """Stop capturing; the calls since :meth:`begin`, ``{name: [LayerCall, ...]}`` in call
        order (gradients are filled in by a backward pass run before this)."""
        self.active = False
        calls, self.calls = self.calls, {}
        return calls

    def _hook(self, name):
        def hook(mod, inputs, out):
            if not self.active:
                return None
            call = LayerCall(inputs[0])
            self.calls[name].append(call)
            if out.requires_grad:
                out.register_hook(call._save)
            return out.clone() if self.clone_output else None

        return hook
