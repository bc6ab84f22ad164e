use llm_formats::{ModelSource, TensorStore};
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let s = ModelSource::open(std::path::Path::new(&a[1])).unwrap();
    println!("{}", s.config());
    for name in &a[2..] {
        let t = s.tensors().f32(name).unwrap();
        let sum: f64 = t.data.iter().map(|&x| x as f64).sum();
        println!("{name} {:?} sum={sum} first={:?}", t.shape, &t.data[..8]);
    }
}
