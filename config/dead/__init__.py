"""``omniroute dead list|show|replay|purge`` (issue 17): the operator's view of
``omniroute.dead``. ``letters`` reads a dead letter's headers (why, from where, when),
``queue`` holds the queue's messages unacknowledged while a command looks at them, ``render``
prints them, ``cli`` is the command."""
