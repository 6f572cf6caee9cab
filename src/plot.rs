//! `alexnet plot LOG -o curves.png`: loss, error and learning-rate curves from a training log,
//! drawn straight into a PNG (no plotting library, no fonts: a 5x7 pixel font is built in).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use image::{Rgb, RgbImage};

use crate::train::LogLine;

const W: u32 = 900;
const PANEL_H: u32 = 260;
const MARGIN_L: u32 = 80;
const MARGIN_R: u32 = 20;
const MARGIN_T: u32 = 30;
const MARGIN_B: u32 = 30;
const BLUE: Rgb<u8> = Rgb([31, 119, 180]);
const ORANGE: Rgb<u8> = Rgb([255, 127, 14]);
const GREY: Rgb<u8> = Rgb([200, 200, 200]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);

/// One curve: its label, colour and (x, y) points.
struct Series {
    label: String,
    colour: Rgb<u8>,
    points: Vec<(f64, f64)>,
}

/// Colours of the curves, in order (matplotlib's ten): each run's training curves take the
/// next, and its validation curve, if it has one, the one after.
const PALETTE: [Rgb<u8>; 10] = [
    BLUE,
    ORANGE,
    Rgb([44, 160, 44]),
    Rgb([214, 39, 40]),
    Rgb([148, 103, 189]),
    Rgb([140, 86, 75]),
    Rgb([227, 119, 194]),
    Rgb([127, 127, 127]),
    Rgb([188, 189, 34]),
    Rgb([23, 190, 207]),
];

/// Reads JSON-lines training logs and draws three panels against epochs: training loss,
/// top-1 error (training and validation, %), and the learning rate (log scale). With several
/// logs, each run is labelled with its file name (or its folder's, for `log.jsonl`).
pub fn plot(logs: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    let mut panels: [(&str, bool, Vec<Series>); 3] =
        [("LOSS", false, Vec::new()), ("TOP-1 ERROR %", false, Vec::new()), ("LEARNING RATE", true, Vec::new())];
    let mut colours = PALETTE.iter().cycle();
    for log in logs {
        let lines = read_log(log)?;
        let name = if logs.len() == 1 { String::new() } else { run_name(log) + " " };
        let steps: Vec<&LogLine> = lines.iter().filter(|l| l.train_top1_error.is_some()).collect();
        if steps.is_empty() {
            bail!("{} has no training steps to plot", log.display())
        }
        let series = |label: String, colour, f: &dyn Fn(&LogLine) -> Option<f64>, from: &[&LogLine]| Series {
            label,
            colour,
            points: from.iter().filter_map(|l| f(l).map(|y| (l.epoch, y))).collect(),
        };
        let all: Vec<&LogLine> = lines.iter().collect();
        let train = *colours.next().expect("cycle");
        panels[0].2.push(series(format!("{name}TRAIN"), train, &|l| Some(l.loss), &steps));
        panels[1].2.push(series(format!("{name}TRAIN"), train, &|l| l.train_top1_error.map(|e| 100.0 * e), &steps));
        if all.iter().any(|l| l.val_top1_error.is_some()) {
            let val = *colours.next().expect("cycle");
            panels[1].2.push(series(format!("{name}VAL"), val, &|l| l.val_top1_error.map(|e| 100.0 * e), &all));
        }
        panels[2].2.push(series(format!("{name}LR"), train, &|l| Some(l.lr), &steps));
    }
    let mut img = RgbImage::from_pixel(W, PANEL_H * panels.len() as u32, Rgb([255, 255, 255]));
    for (i, (title, log_y, series)) in panels.iter().enumerate() {
        draw_panel(&mut img, i as u32 * PANEL_H, title, *log_y, series);
    }
    save_png(&img, out)
}

/// Writes `img` as a PNG, atomically ([`crate::files::write_atomically`]): the plots and the
/// figures all leave either the whole picture or none.
pub fn save_png(img: &RgbImage, out: &Path) -> anyhow::Result<()> {
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).context("cannot encode the picture")?;
    crate::files::write_atomically(out, |file| std::io::Write::write_all(file, png.get_ref()))
}

fn draw_panel(img: &mut RgbImage, top: u32, title: &str, log_y: bool, series: &[Series]) {
    let ty = |y: f64| if log_y { y.max(1e-12).log10() } else { y };
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(ty(y)), y1.max(ty(y)));
    }
    if x0 > x1 {
        return;
    }
    let mut steps = 4;
    if log_y {
        // whole decades, a grid line at each (at every few, if the labels would overlap)
        let (low, high) = (y0.floor(), y1.ceil().max(y0.floor() + 1.0));
        let decades = (high - low) as u32;
        let stride = decades.div_ceil(8);
        steps = decades.div_ceil(stride);
        (y0, y1) = (high - (steps * stride) as f64, high);
    } else {
        if y1 - y0 < 1e-9 {
            (y0, y1) = (y0 - 0.5, y1 + 0.5);
        }
        y0 = y0.min(0.0);
    }
    x0 = x0.min(0.0);
    let (left, right, ptop, bottom) = (MARGIN_L, W - MARGIN_R, top + MARGIN_T, top + PANEL_H - MARGIN_B);
    let px = |x: f64| left as f64 + (x - x0) / (x1 - x0).max(1e-9) * (right - left) as f64;
    let py = |y: f64| bottom as f64 - (ty(y) - y0) / (y1 - y0) * (bottom - ptop) as f64;
    for k in 0..=steps {
        let y = ptop + (bottom - ptop) * k / steps;
        line(img, (left as f64, y as f64), (right as f64, y as f64), GREY);
        let value = y1 - (y1 - y0) * k as f64 / steps as f64;
        let label = if log_y { format!("{:.0e}", 10f64.powf(value)) } else { short(value) };
        text(img, 4, y.saturating_sub(3), &label, BLACK);
    }
    line(img, (left as f64, bottom as f64), (right as f64, bottom as f64), BLACK);
    line(img, (left as f64, ptop as f64), (left as f64, bottom as f64), BLACK);
    text(img, left, top + 8, title, BLACK);
    text(img, left, bottom + 10, "EPOCH 0", BLACK);
    text(img, right - 6 * (short(x1).len() as u32 + 6), bottom + 10, &format!("EPOCH {}", short(x1)), BLACK);
    let legend_width: u32 = series.iter().map(|s| 6 * s.label.len() as u32 + 18).sum();
    let mut legend_x = right.saturating_sub(legend_width).max(left + 6 * title.len() as u32 + 24);
    for s in series {
        text(img, legend_x, top + 8, &s.label, s.colour);
        legend_x += 6 * s.label.len() as u32 + 18;
        for w in s.points.windows(2) {
            line(img, (px(w[0].0), py(w[0].1)), (px(w[1].0), py(w[1].1)), s.colour);
        }
        for &(x, y) in &s.points {
            if s.points.len() < 60 {
                dot(img, px(x), py(y), s.colour);
            }
        }
    }
}

fn read_log(log: &Path) -> anyhow::Result<Vec<LogLine>> {
    let text = std::fs::read_to_string(log).with_context(|| format!("cannot read log {}", log.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {}: not a log line", log.display(), i + 1))
        })
        .collect()
}

/// `results/fig1/relu-log.jsonl` -> "RELU-LOG"; `runs/x/log.jsonl` -> "X".
fn run_name(log: &Path) -> String {
    let stem = log.file_stem().unwrap_or_default().to_string_lossy();
    let name = if stem == "log" {
        log.parent().and_then(|p| p.file_name()).unwrap_or_default().to_string_lossy()
    } else {
        stem
    };
    name.to_uppercase()
}

fn short(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, (ax, ay): (f64, f64), (bx, by): (f64, f64), c: Rgb<u8>) {
    let n = ((bx - ax).abs().max((by - ay).abs()) as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        put(img, (ax + t * (bx - ax)).round() as i64, (ay + t * (by - ay)).round() as i64, c);
    }
}

fn dot(img: &mut RgbImage, x: f64, y: f64, c: Rgb<u8>) {
    for dx in -2..=2 {
        for dy in -2..=2 {
            put(img, x.round() as i64 + dx, y.round() as i64 + dy, c);
        }
    }
}

/// Draws `s` in the built-in 5x7 font (letters as upper case, digits, `.-+%_/`), 6 pixels a character.
fn text(img: &mut RgbImage, x: u32, y: u32, s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let rows = glyph(ch.to_ascii_uppercase());
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..5 {
                if bits >> (4 - col) & 1 == 1 {
                    put(img, (x + 6 * i as u32 + col) as i64, (y + r as u32) as i64, c);
                }
            }
        }
    }
}

fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'D' => [28, 18, 17, 17, 17, 18, 28],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 10, 4, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '_' => [0, 0, 0, 0, 0, 0, 31],
        '/' => [1, 1, 2, 4, 8, 16, 16],
        _ => [0; 7],
    }
}
