//! Every shader variant the crate can select: parse and validate with naga, specialise the
//! override constants, then translate to SPIR-V, MSL, HLSL and GLSL (ES 3.1, what wgpu's GL
//! backend uses). Native-f16 variants cannot be expressed in GLSL; the test asserts that exact
//! error, and the crate never selects them on GL (it widens packed f16 instead).

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use naga::ShaderStage;
use seq_kernels::kernels::all_shader_variants;

#[test]
fn every_variant_translates_to_every_backend() {
    let variants = all_shader_variants();
    assert!(
        variants.len() > 10,
        "expected the full variant list, got {}",
        variants.len()
    );
    let mut glsl_f16_refusals = 0;
    for v in &variants {
        let name = format!("{}/{}/{}", v.family, v.variant, v.entry);
        let module = naga::front::wgsl::parse_str(&v.source)
            .unwrap_or_else(|e| panic!("{name}: parse error\n{}", e.emit_to_string(&v.source)));
        let info = Validator::new(ValidationFlags::all(), Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| {
                panic!("{name}: validation error\n{}", e.emit_to_string(&v.source))
            });
        let constants: naga::back::PipelineConstants =
            v.constants.iter().map(|(k, x)| (k.clone(), *x)).collect();
        let (module, info) = naga::back::pipeline_constants::process_overrides(
            &module,
            &info,
            Some((ShaderStage::Compute, v.entry)),
            &constants,
        )
        .unwrap_or_else(|e| panic!("{name}: overrides: {e}"));
        assert!(
            module.entry_points.iter().any(|ep| ep.name == v.entry),
            "{name}: entry point missing"
        );

        let spv_out = spv::write_vec(
            &module,
            &info,
            &spv::Options::default(),
            Some(&spv::PipelineOptions {
                shader_stage: ShaderStage::Compute,
                entry_point: v.entry.into(),
            }),
        )
        .unwrap_or_else(|e| panic!("{name}: SPIR-V: {e}"));
        assert!(
            spv_out.len() > 5 && spv_out[0] == 0x0723_0203,
            "{name}: not SPIR-V"
        );

        let msl_opts = msl::Options {
            lang_version: (2, 4),
            ..Default::default()
        };
        let msl_pipe = msl::PipelineOptions {
            entry_point: Some((ShaderStage::Compute, v.entry.into())),
            ..Default::default()
        };
        let (msl_src, _) = msl::write_string(&module, &info, &msl_opts, &msl_pipe)
            .unwrap_or_else(|e| panic!("{name}: MSL: {e}"));
        assert!(msl_src.contains("kernel"), "{name}: MSL has no kernel");

        let hlsl_opts = hlsl::Options {
            shader_model: hlsl::ShaderModel::V6_2,
            ..Default::default()
        };
        let hlsl_pipe = hlsl::PipelineOptions {
            entry_point: Some((ShaderStage::Compute, v.entry.into())),
        };
        let mut hlsl_src = String::new();
        hlsl::Writer::new(&mut hlsl_src, &hlsl_opts, &hlsl_pipe)
            .write(&module, &info, None)
            .unwrap_or_else(|e| panic!("{name}: HLSL: {e}"));
        assert!(
            hlsl_src.contains("numthreads"),
            "{name}: HLSL has no numthreads"
        );

        let glsl_opts = glsl::Options {
            version: glsl::Version::Embedded {
                version: 310,
                is_webgl: false,
            },
            ..Default::default()
        };
        let glsl_pipe = glsl::PipelineOptions {
            shader_stage: ShaderStage::Compute,
            entry_point: v.entry.into(),
            multiview: None,
        };
        let mut glsl_src = String::new();
        let glsl_result = glsl::Writer::new(
            &mut glsl_src,
            &module,
            &info,
            &glsl_opts,
            &glsl_pipe,
            naga::proc::BoundsCheckPolicies::default(),
        )
        .and_then(|mut w| w.write());
        let native_f16 = v.source.contains("enable f16;");
        match glsl_result {
            Ok(_) => {
                // An entry point of an f16 module that never touches f16 data (e.g. one that
                // only reads a mask) translates; one that does must not.
                assert!(
                    !glsl_src.contains("float16"),
                    "{name}: f16 types in GLSL output"
                );
                assert!(glsl_src.contains("void main"), "{name}: GLSL has no main");
            }
            Err(glsl::Error::UnsupportedScalar(s)) if native_f16 && s.width == 2 => {
                glsl_f16_refusals += 1
            }
            Err(e) => panic!("{name}: GLSL: {e}"),
        }
    }
    assert!(
        glsl_f16_refusals > 0,
        "no native-f16 variant was checked against GLSL"
    );
}

/// `Step::new` refuses a buffer bound both writable and read-only by reading each shader's
/// declarations as text; that reading must agree with naga's for every variant.
#[test]
fn declared_bindings_agree_with_naga() {
    use seq_kernels::shader::{declared_bindings, Access, Declared};
    for v in &all_shader_variants() {
        let module = naga::front::wgsl::parse_str(&v.source).expect("parses (see the test above)");
        let mut from_naga: Vec<Declared> = module
            .global_variables
            .iter()
            .filter_map(|(_, g)| {
                let b = g.binding.as_ref().filter(|b| b.group == 0)?;
                let access = match g.space {
                    naga::AddressSpace::Uniform => Access::Uniform,
                    naga::AddressSpace::Storage { access }
                        if access.contains(naga::StorageAccess::STORE) =>
                    {
                        Access::ReadWrite
                    }
                    naga::AddressSpace::Storage { .. } => Access::Read,
                    ref other => panic!("{}: unexpected address space {other:?}", v.family),
                };
                Some(Declared {
                    index: b.binding,
                    name: g.name.clone().unwrap_or_default(),
                    access,
                })
            })
            .collect();
        let mut from_text = declared_bindings(&v.source);
        from_naga.sort_by_key(|d| d.index);
        from_text.sort_by_key(|d| d.index);
        assert!(!from_naga.is_empty(), "{}: no bindings", v.family);
        assert_eq!(from_text, from_naga, "{}/{}", v.family, v.variant);
    }
}
