//! PNG files whose header announces other dimensions than their pixels (crafted files,
//! shared by the library's and the CLI's tests).

/// `png` (a PNG file) with its `IHDR` header announcing `width x height` pixels, its
/// checksum recomputed so decoders read on to the dimensions.
pub fn with_size(png: &[u8], width: u32, height: u32) -> Vec<u8> {
    // Signature (8 bytes), IHDR length (4), "IHDR" (4), width, height, 5 more bytes, CRC.
    assert_eq!(
        &png[12..16],
        b"IHDR",
        "a PNG file starts with its IHDR chunk"
    );
    let mut out = png.to_vec();
    out[16..20].copy_from_slice(&width.to_be_bytes());
    out[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&out[12..29]);
    out[29..33].copy_from_slice(&crc.to_be_bytes());
    out
}

/// CRC-32 (IEEE 802.3, as PNG chunks use it), bit by bit.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
