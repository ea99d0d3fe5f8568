"""
Run ollamaproxy as a daemon with twistd:

    twistd -y ollamaproxy.tac        # background: twistd.pid, twistd.log (rotated)
    twistd -n -y ollamaproxy.tac     # foreground

Settings come from the environment and a .env file in the working
directory, as for `twist ollamaproxy`, and the service is built by the same
makeService, so the two ways to run it cannot drift apart.
"""

from twisted.application.service import Application

from ollamaproxy.tap import Options, makeService

options = Options()
options.parseOptions([])

application = Application("ollamaproxy")
makeService(options).setServiceParent(application)
