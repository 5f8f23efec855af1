# gdb -batch -ex 'python OUT="file"' -x gdb_doorbell.py --args PROGRAM
# Stops at every `cpuid` executed in libvmwsyslog.so's vmw_doorbell and
# records "RAX RBX RCX\n" (hex) followed by the RCX bytes at guest address
# RBX -- what a hypervisor handling the doorbell would copy.
import gdb

done = False


def on_exit(event):
    global done
    done = True


gdb.events.exited.connect(on_exit)
gdb.execute("set pagination off")
gdb.execute("set confirm off")
gdb.execute("set breakpoint pending on")
gdb.Breakpoint("vmw_doorbell")
out = open(OUT, "wb")
gdb.execute("run", to_string=True)
while not done:
    for _ in range(50):
        pc = int(gdb.parse_and_eval("$pc"))
        asm = gdb.selected_frame().architecture().disassemble(pc)[0]["asm"]
        if asm.startswith("cpuid"):
            break
        gdb.execute("stepi", to_string=True)
    else:
        raise gdb.GdbError("no cpuid in vmw_doorbell")
    regs = [int(gdb.parse_and_eval("$" + r)) & (2**64 - 1) for r in ("rax", "rbx", "rcx")]
    mem = gdb.selected_inferior().read_memory(regs[1], regs[2]).tobytes()
    out.write(b"%x %x %x\n" % tuple(regs) + mem)
    gdb.execute("continue", to_string=True)
out.close()
