"""Clean interruption: SIGINT/SIGTERM ask the training loop to stop after the current step."""

import signal

import torch


class StopRequest:
    """Records the first SIGINT/SIGTERM; a second one restores the default handler's behaviour (stop now)."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signum = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: give up on the clean stop
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def requested(self, accelerator):
        """True on every rank as soon as any rank was signalled (one tiny all-reduce per step)."""
        flag = torch.tensor(float(self.signum is not None), device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0

    def exit_code(self):
        return 128 + (self.signum or signal.SIGTERM)
