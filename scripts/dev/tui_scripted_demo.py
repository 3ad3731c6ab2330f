#!/usr/bin/env python3
"""The TUI over a scripted chat (tests/test_tui.py's ScriptedChat): real screens with a
realistic reasoning + answer, for screenshots without a model.

    python scripts/dev/tui_scripted_demo.py        (then Enter, Ctrl+T, ...; Ctrl+Q quits)
"""

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from test_tui import ScriptedChat  # noqa: E402

from gptoss_mlx.tui import ChatApp, ConversationStore  # noqa: E402

REASONING = ("The user asks why the sky is blue. Explain Rayleigh scattering: shorter wavelengths "
             "scatter more (∝ 1/λ⁴). Mention why sunsets are red. Keep it short; reasoning "
             "effort is low, so no derivation.")
ANSWER = ("The sky is blue because of **Rayleigh scattering**: air molecules scatter short "
          "wavelengths far more than long ones (∝ 1/λ⁴), so blue light reaches your eyes from "
          "every direction.\n\nAt sunset the light crosses much more air, the blue is scattered "
          "away, and the reds and oranges remain.\n")


def words(text, kind):
    return [(kind, w + " ") for w in text.split(" ")]


chat = ScriptedChat(words(REASONING, "analysis") + words(ANSWER, "final"),
                    words("Checking: λ⁴ law holds for particles much smaller than the wavelength.", "analysis")
                    + words("Yes — that is why clouds, with large droplets, look white instead.", "final"))
app = ChatApp(chat, model_name="gpt-oss-20b", store=ConversationStore(Path(tempfile.mkdtemp())),
              collapse_on_answer="--collapse" in sys.argv, effort="low")
app.run()
