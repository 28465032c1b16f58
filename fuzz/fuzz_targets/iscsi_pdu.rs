//! iSCSI PDU framing (`grove_iscsi::pdu::read_pdu`) on arbitrary bytes, with and without
//! header and data digests and with a data-segment limit taken from the input.
//!
//! Every PDU of the input is read until the stream ends or a PDU is refused; nothing may panic,
//! and no data segment longer than the limit may be allocated.

#![no_main]

use grove_iscsi::pdu::{read_pdu, Digests, PduError};
use libfuzzer_sys::fuzz_target;

/// PDUs read from one input at most (each takes at least 48 bytes, so this is not reached).
const PDUS_MAX: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Some((&control, mut stream)) = data.split_first() else {
        return;
    };
    let digests = Digests {
        header: control & 1 != 0,
        data: control & 2 != 0,
    };
    // Small limits make the refusal path reachable; 8 KiB and 256 KiB are the real ones.
    let max_data = match control >> 2 & 3 {
        0 => 0,
        1 => 512,
        2 => 8192,
        _ => 256 * 1024,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async {
        for _ in 0..PDUS_MAX {
            match read_pdu(&mut stream, digests, max_data).await {
                Ok(Some(pdu)) => {
                    assert!(pdu.data.len() <= max_data as usize);
                    assert_eq!(pdu.ahs.len() % 4, 0);
                    // Re-encoding what was read must work for any header.
                    let mut copy = pdu.clone();
                    let _ = copy.encode_header(digests);
                    let _ = copy.encode_trailer(digests);
                    let _ = (pdu.opcode(), pdu.itt(), pdu.lun(), pdu.final_bit());
                }
                Ok(None) => break,
                Err(PduError::DataDigest { .. }) => continue,
                Err(_) => break,
            }
        }
    });
});
