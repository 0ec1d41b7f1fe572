"""Labs: real QEMU guests started by pyvhost for tests and demonstrations.

The guests: :mod:`.qemu` starts QEMU (Debian 12's 7.2, or $PYVHOST_QEMU), connects to
its QMP monitors and boots the test guest; :mod:`.accel` picks KVM or TCG; :mod:`.image`
(with :mod:`.initramfs`) builds the guest's kernel and initramfs; :mod:`.guest` talks to
it over its command channel, whose wire format is :mod:`.channel`.

``pyvhost lab`` (its command line is :mod:`pyvhost.cli.lab`; nothing here imports the
command line): :mod:`.config` says what to run, :mod:`.machines` starts and ends
``pyvhost net`` and the VMs, :mod:`.traffic` pings between them, :mod:`.measure` reads the
back-end, QEMU and the clock into the typed records of :mod:`.records`, :mod:`.checks`
judges them, :mod:`.scenario` runs the steps in order, and :mod:`.document` makes the
``pyvhost.lab/1`` JSON document. The relay that times a back-end's memory updates and the
process helpers are in :mod:`pyvhost.tools`.
"""
