"""
The operations files stay in step with the settings: C{.env.example},
C{contrib/systemd/ollamaproxy.service} and C{contrib/logrotate/ollamaproxy}.
"""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import SynchronousTestCase

from ollamaproxy.config import SETTINGS, read_dotenv, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


class EnvExampleTests(SynchronousTestCase):
    def test_every_setting_is_listed_once_with_its_default(self) -> None:
        """
        .env.example names every setting's environment variable once: set to
        its default, or commented out when it has none; and no other.
        """
        lines = re.findall(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", _read(".env.example"), re.MULTILINE)
        listed = dict(lines)
        self.assertEqual(len(lines), len(listed), "a variable is listed twice")
        self.assertEqual(set(listed), {setting.env_name for setting in SETTINGS})
        for setting in SETTINGS:
            self.assertEqual(listed[setting.env_name], setting.default or "", setting.env_name)

    def test_as_a_dotenv_file_it_changes_nothing(self) -> None:
        """
        Copied to .env unchanged, the example resolves to the defaults.
        """
        dotenv = read_dotenv(os.path.join(ROOT, ".env.example"))
        self.assertEqual(resolve({}, {}, dotenv), resolve({}, {}, {}))


class SystemdUnitTests(SynchronousTestCase):
    def test_stop_timeout_outlasts_the_grace_period(self) -> None:
        """
        systemd waits longer than the default grace period plus the 5 s
        closing connections get, reloads with SIGHUP and stops with SIGTERM.
        """
        unit = _read("contrib", "systemd", "ollamaproxy.service")
        [grace] = [float(s.default) for s in SETTINGS if s.name == "grace-period" and s.default]
        timeout = float(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE).group(1))
        self.assertGreater(timeout, grace + 5)
        self.assertIn("\nExecReload=/bin/kill -HUP $MAINPID\n", unit)
        self.assertIn("\nKillSignal=SIGTERM\n", unit)
        self.assertRegex(unit, r"\nExecStart=\S+/twist .*ollamaproxy\n")


class LogrotateTests(SynchronousTestCase):
    def test_rotation_renames_and_signals(self) -> None:
        """
        logrotate renames the CSV (no copytruncate) and sends SIGHUP.
        """
        snippet = _read("contrib", "logrotate", "ollamaproxy")
        rules = "\n".join(line for line in snippet.splitlines() if not line.lstrip().startswith("#"))
        self.assertIn("/ollama-proxy.csv {", rules)
        self.assertNotIn("copytruncate", rules)
        self.assertRegex(rules, r"postrotate[\s\S]*kill -HUP[\s\S]*endscript")
