"""Where the mail servers and the Dovecot fixture used to be, kept for the importers not
moved with them: bench/ (imap_ingest, hostile, faults/dovecot_restart) and
tests/test_lifecycle.py. The servers are tests/support/mail.py's now, the fixtures
tests/email/conftest.py's; once those import from there, this file goes."""

from tests.email.conftest import dovecot as dovecot
from tests.support.mail import PASSWORD as PASSWORD
from tests.support.mail import USER as USER
from tests.support.mail import Dovecot as Dovecot
from tests.support.mail import fill_maildir as fill_maildir
from tests.support.mail import mailbox_toml as mailbox_toml
from tests.support.mail import make_mail as make_mail
from tests.support.net import free_port as free_port
