# Stage the UniversalSegLib package (the library, one folder above this module) for the Slicer module.
#
# slicerMacroBuildScriptedModule copies each SCRIPTS entry to <qt-scripted-modules>/<path relative to the
# module's source folder>, or, for an absolute path, relative to the module's BINARY folder. A path such as
# ../UniversalSegLib/x.py would therefore land outside qt-scripted-modules (not on Slicer's sys.path).
# So the library is first copied (configure_file, which also re-runs CMake when a file changes) into
# <binary dir>/UniversalSegLib/, and those absolute paths are given as SCRIPTS: they are installed as
# <qt-scripted-modules>/UniversalSegLib/..., next to UniversalSeg.py, and byte-compiled like the module.
# RESOURCES only accept paths relative to the source folder, so the library's data files (taxonomy
# tables) are copied straight into the qt-scripted-modules tree and installed explicitly.
#
# A glob (re-evaluated at build time with CONFIGURE_DEPENDS) rather than a hand-written list: the library
# is developed outside this module, and a file missing from a list would work in a source checkout but
# be absent from the packaged extension.

function(universalseg_stage_library lib_dir stage_dir out_scripts out_data)
  set(_depends CONFIGURE_DEPENDS)
  if(CMAKE_SCRIPT_MODE_FILE)  # cmake -P (used by the test suite) does not allow CONFIGURE_DEPENDS
    set(_depends)
  endif()
  file(GLOB_RECURSE _py RELATIVE "${lib_dir}" ${_depends} "${lib_dir}/*.py")
  file(GLOB_RECURSE _data RELATIVE "${lib_dir}" ${_depends} "${lib_dir}/data/*.json" "${lib_dir}/data/*.csv"
    "${lib_dir}/data/demo/*.safetensors")  # the small demo model: the self-test segments with it
  list(FILTER _py EXCLUDE REGEX "(^|/)__pycache__/")
  list(SORT _py)
  list(SORT _data)
  set(_scripts)
  foreach(_file IN LISTS _py)
    configure_file("${lib_dir}/${_file}" "${stage_dir}/UniversalSegLib/${_file}" COPYONLY)
    list(APPEND _scripts "${stage_dir}/UniversalSegLib/${_file}")
  endforeach()
  set(${out_scripts} ${_scripts} PARENT_SCOPE)
  set(${out_data} ${_data} PARENT_SCOPE)
endfunction()
