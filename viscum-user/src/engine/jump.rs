//! The classifiers' tail-call table: rare paths (ICMP errors) run as their
//! own programs, each with its own stack and verifier budget.

use aya::{Ebpf, maps::ProgramArray, programs::SchedClassifier};
use viscum_common::{
    ICMP_INGRESS_PROG, ICMP_REPLY_PROG, JUMP_ICMP_INGRESS, JUMP_ICMP_REPLY, JUMP_MAP, JUMP_RECOVER,
    RECOVER_PROG,
};

use super::EngineError;

/// Puts the loaded ICMP and flow-recovery programs into their slots of the (pinned) program
/// array. The pin keeps the entries, so a later process needs no refill.
pub(super) fn fill(ebpf: &mut Ebpf) -> Result<(), EngineError> {
    let mut fds = Vec::new();
    for (slot, name) in [
        (JUMP_ICMP_INGRESS, ICMP_INGRESS_PROG),
        (JUMP_ICMP_REPLY, ICMP_REPLY_PROG),
        (JUMP_RECOVER, RECOVER_PROG),
    ] {
        let prog: &SchedClassifier = ebpf
            .program(name)
            .ok_or_else(|| {
                EngineError::io(
                    format!("the embedded object has no program {name}"),
                    std::io::ErrorKind::NotFound.into(),
                )
            })?
            .try_into()
            .map_err(|e| {
                EngineError::prog(format!("the embedded program {name} has the wrong type"), e)
            })?;
        let fd = prog
            .fd()
            .map_err(|e| EngineError::prog(format!("{name} is not loaded"), e))?
            .try_clone()
            .map_err(|e| EngineError::io(format!("cannot duplicate the fd of {name}"), e))?;
        fds.push((slot, fd));
    }
    let map = ebpf.map_mut(JUMP_MAP).ok_or_else(|| {
        EngineError::io(
            format!("the embedded object has no map {JUMP_MAP}"),
            std::io::ErrorKind::NotFound.into(),
        )
    })?;
    let mut table = ProgramArray::try_from(map)
        .map_err(|e| EngineError::map(format!("{JUMP_MAP} is not a program array"), e))?;
    for (slot, fd) in &fds {
        table
            .set(*slot, fd, 0)
            .map_err(|e| EngineError::map(format!("cannot fill slot {slot} of {JUMP_MAP}"), e))?;
    }
    Ok(())
}
