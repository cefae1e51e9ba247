//! Capybara's kernel programs (skeleton; filled in by the foundation work).
#![no_std]
#![no_main]

mod maps;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn xdp_guard(_ctx: XdpContext) -> u32 {
    // Touch the maps so they are emitted in the object while the programs are being written.
    let _ = maps::CONFIG.get(0);
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
