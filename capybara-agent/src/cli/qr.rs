//! QR codes of client configs: on the terminal (two modules per character cell with the
//! Unicode half blocks, so a full wg-quick config fits an 80-column terminal) and as a PNG
//! (8 pixels per module, 4-module quiet zone, 1-bit grayscale), written with `png` from the
//! module grid rather than pulling in the `image` crate, mode 0600 (it holds a private key).

use std::path::Path;

use qrcode::{Color, QrCode, render::unicode::Dense1x2};

/// Pixels per module in the PNG.
const SCALE: usize = 8;
/// Quiet zone around the code, in modules.
const QUIET: usize = 4;

/// Why the PNG could not be written.
#[derive(Debug, thiserror::Error)]
pub enum QrFileError {
    /// The text does not fit a QR code.
    #[error(transparent)]
    Qr(#[from] qrcode::types::QrError),
    /// The file could not be written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The QR code of `text` for a terminal (dark modules on a light background).
pub fn terminal(text: &str) -> Result<String, qrcode::types::QrError> {
    let code = QrCode::new(text.as_bytes())?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build()
        + "\n")
}

/// The 8-bit grayscale pixels (0 = dark) and the side length of the PNG of `text`.
pub fn pixels(text: &str) -> Result<(Vec<u8>, usize), qrcode::types::QrError> {
    let code = QrCode::new(text.as_bytes())?;
    let w = code.width();
    let colors = code.to_colors();
    let side = (w + 2 * QUIET) * SCALE;
    let mut px = vec![255u8; side * side];
    for (i, c) in colors.iter().enumerate() {
        if *c == Color::Dark {
            let (mx, my) = (i % w + QUIET, i / w + QUIET);
            for y in my * SCALE..(my + 1) * SCALE {
                px[y * side + mx * SCALE..y * side + (mx + 1) * SCALE].fill(0);
            }
        }
    }
    Ok((px, side))
}

/// Writes the QR code of `text` to `path` as a PNG, mode 0600 (the code holds the private key;
/// see [`super::output::create_private`]).
pub fn write_png(text: &str, path: &Path) -> Result<(), QrFileError> {
    let (px, side) = pixels(text)?;
    let file = std::io::BufWriter::new(super::output::create_private(path)?);
    let mut enc = png::Encoder::new(file, side as u32, side as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(std::io::Error::other)?;
    w.write_image_data(&px).map_err(std::io::Error::other)?;
    w.finish().map_err(std::io::Error::other)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_decodes_to_the_module_grid() {
        let text = "[Interface]\nPrivateKey = x\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qr.png");
        write_png(text, &path).unwrap();
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        let code = QrCode::new(text.as_bytes()).unwrap();
        let w = code.width();
        assert_eq!(info.width as usize, (w + 2 * QUIET) * SCALE);
        // Every module's centre pixel has the module's colour; the quiet zone is light.
        let side = info.width as usize;
        for (i, c) in code.to_colors().iter().enumerate() {
            let (x, y) = (
                (i % w + QUIET) * SCALE + SCALE / 2,
                (i / w + QUIET) * SCALE + SCALE / 2,
            );
            assert_eq!(buf[y * side + x] == 0, *c == Color::Dark, "module {i}");
        }
        assert_eq!(buf[0], 255);
    }

    #[test]
    fn terminal_code_has_one_line_per_two_module_rows() {
        let text = "hello";
        let code = QrCode::new(text.as_bytes()).unwrap();
        let rows = terminal(text).unwrap().lines().count();
        assert_eq!(rows, (code.width() + 2 * QUIET).div_ceil(2));
    }
}
