"""Storage backends (the contract in ``base.py``, opening one from a worker spec in
``registry.py``): where a block device's data lives (an image file, an NBD export).

A storage backend ("backend" alone means the vhost-user back end) serves vectored
reads and writes between guest memory and its store. Every operation either finishes
inline, when that cannot block the event loop (a page-cache hit), or is handed to
machinery that completes it later (a thread pool, an NBD connection) and reports the
completion *on the loop thread of the process serving the queue* through one callback
the device installs once, ``on_complete(token, error)``, ``error`` being 0 or a
positive errno. The device picks the tokens; the backend only carries them.

Return values of the operations: :data:`DONE` (finished inline), :data:`PENDING`
(``on_complete`` follows), or an ``OSError`` raised (failed inline).
"""
